"""The source headers every output carries, built and read back."""

from __future__ import annotations

from streamer.headers import SOURCE_OFFSET, source_header_prefix, source_headers


class TestSourceHeaders:
    def test_prefix_plus_offset_equals_the_three_headers(self) -> None:
        """The per-partition prefix builds the same headers as `source_headers`."""
        prefix = source_header_prefix("transactions", 3)
        built = [*prefix, (SOURCE_OFFSET, str(1234).encode())]
        assert built == source_headers("transactions", 3, 1234)
