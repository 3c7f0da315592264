"""A local stand-in for a Confluent Schema Registry: the REST subset confluent-kafka's client uses.

No registry server can be installed on these machines, so the integration tests speak to this
one (standard library only, in a thread). It answers what `SchemaRegistryClient` 2.16 asks of a
registry when an `AvroSerializer` registers a schema and when a reader fetches one by id:

- `GET /associations/resources/-/<topic>?...` (the serializer's default subject strategy looks
  for an association first): 404, as a registry without associations answers; the client then
  falls back to the `<topic>-value` subject;
- `POST /subjects/<subject>/versions?normalize=...` with `{"schema": ..., "schemaType": ...}`:
  `{"id": N}`, the same id for the same schema text under any subject, as a registry does;
- `GET /schemas/ids/<N>[?subject=...]`: `{"schema": ..., "schemaType": ...}` (the type left out
  for Avro), or 404 with error code 40403 for an unknown id.

Anything else is a 404. `fail_next(n, status)` makes the next `n` schema lookups by id fail with
`status`, to play a registry outage.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit


class RegistryStandIn:
    """Schemas by id and subject, served on 127.0.0.1 at `url` while running."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ids: dict[tuple[str, str], int] = {}
        """(schema text, type) → id."""
        self._schemas: dict[int, tuple[str, str]] = {}
        self.subjects: dict[str, list[int]] = {}
        self.requests: list[tuple[str, str]] = []
        self._failures: list[int] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> RegistryStandIn:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def fail_next(self, count: int, status: int = 503) -> None:
        """The next `count` lookups by id answer `status` instead of the schema."""
        with self._lock:
            self._failures.extend([status] * count)

    def register(self, subject: str, schema: str, schema_type: str = "AVRO") -> int:
        with self._lock:
            schema_id = self._ids.setdefault((schema, schema_type), len(self._ids) + 1)
            self._schemas[schema_id] = (schema, schema_type)
            versions = self.subjects.setdefault(subject, [])
            if schema_id not in versions:
                versions.append(schema_id)
            return schema_id

    def _lookup(self, schema_id: int) -> tuple[int, dict[str, Any]]:
        with self._lock:
            if self._failures:
                status = self._failures.pop(0)
                return status, {"error_code": status * 100, "message": "stand-in outage"}
            found = self._schemas.get(schema_id)
        if found is None:
            return 404, {"error_code": 40403, "message": f"Schema {schema_id} not found"}
        schema, schema_type = found
        body: dict[str, Any] = {"schema": schema}
        if schema_type != "AVRO":
            body["schemaType"] = schema_type
        return 200, body

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        registry = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = urlsplit(self.path).path.strip("/").split("/")
                registry.requests.append(("GET", self.path))
                if len(path) == 3 and path[:2] == ["schemas", "ids"] and path[2].isdigit():
                    self._reply(*registry._lookup(int(path[2])))
                else:
                    self._reply(404, {"error_code": 404, "message": "HTTP 404 Not Found"})

            def do_POST(self) -> None:
                path = urlsplit(self.path).path.strip("/").split("/")
                registry.requests.append(("POST", self.path))
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length) or b"{}")
                if len(path) == 3 and path[0] == "subjects" and path[2] == "versions":
                    schema_type = body.get("schemaType") or "AVRO"
                    schema_id = registry.register(unquote(path[1]), body["schema"], schema_type)
                    self._reply(200, {"id": schema_id})
                else:
                    self._reply(404, {"error_code": 404, "message": "HTTP 404 Not Found"})

            def _reply(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                return

        return Handler
