"""A keyed store kept per input partition, with what changed since the last commit.

No Kafka here: the checkpoint (`streamer.checkpoint`) writes the store's changes to its changelog
topic and commits them with the input offsets; the restorer (`streamer.kafka.changelog`) rebuilds
a partition from that changelog. The store only keeps values in memory and answers three
questions: which keys changed since the last commit (`changes`), what the state was at the last
commit (`rollback`), and which input offsets the state covers (`positions`).

A restore keeps each value as the changelog's bytes and decodes it the first time a record of its
key is scored: a restore costs a dict insert per changelog record, and only the keys that are
used pay for decoding.

A value is any mutable object with a `StateCodec` (how to encode, decode, copy and expire it):
the card history is one, and a store of per-merchant values would be another. Keys are strings
(the input record's key); a key lives in the partition its records come from.

Not thread-safe: one store per scoring loop, used on its thread.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar, cast

from streamer.errors import StreamerError

V = TypeVar("V")


class StateCorruptError(StreamerError):
    """A stored value (from the changelog) cannot be decoded; the state cannot be trusted."""


@dataclass(frozen=True, slots=True)
class StateCodec(Generic[V]):
    """How a store handles its values."""

    encode: Callable[[V], bytes]
    """The value as changelog bytes; `decode(encode(v))` equals `v`."""
    decode: Callable[[bytes], V]
    """A value from changelog bytes; `ValueError` (saying why) for bytes it cannot read."""
    copy: Callable[[V], V]
    """An independent copy, kept to roll back to."""
    expired: Callable[[V, int], bool]
    """Whether the value can be dropped at this stream time (ms): it no longer affects anything."""
    expired_encoded: Callable[[bytes, int], bool]
    """`expired` of the value `encode` gave these bytes, read without decoding it (a restored
    value no record has used yet is judged so); False for bytes it cannot judge."""


@dataclass(slots=True)
class _Partition(Generic[V]):
    values: dict[str, V] = field(default_factory=dict)
    raw: dict[str, bytes] = field(default_factory=dict)
    """Restored values not decoded yet (a key is in `values` or `raw`, never both)."""
    changed: set[str] = field(default_factory=set)
    """Keys written since the last commit (a deleted key included)."""
    undo: dict[str, V | None] = field(default_factory=dict)
    """Each changed key's value at the last commit (None: absent then); kept when rolling back."""
    position: int | None = None
    """The next input offset: every record before it is applied (None: nothing applied yet)."""
    committed_position: int | None = None
    snapshot: set[str] = field(default_factory=set)
    """Keys of the snapshot being written (`begin_snapshot`) whose values are not encoded yet."""
    snapshot_written: list[tuple[str, bytes | None]] = field(default_factory=list)
    """Values of the snapshot encoded by `checkout` before it let a record change them."""
    stream_time: int = 0
    """The latest event time (ms) applied in this partition, for expiry."""
    sweep: list[str] = field(default_factory=list)
    """Keys the sweep under way (`begin_sweep`) has yet to look at."""
    sweep_at: int = 0
    """The stream time (ms) the sweep under way judges expiry at."""


class KeyedStore(Generic[V]):
    """One named store: per partition, key → value, and the changes since the last commit.

    `keep_undo`: remember each changed key's committed value so `rollback` can return to it
    (exactly-once, where a transaction can abort); at-least-once never rolls back.
    """

    def __init__(self, name: str, codec: StateCodec[V], *, keep_undo: bool) -> None:
        self.name = name
        self.codec = codec
        self._keep_undo = keep_undo
        self._partitions: dict[int, _Partition[V]] = {}

    # -- partitions ----------------------------------------------------------------------------

    def assign(self, partition: int) -> None:
        """Start `partition` empty (its changelog is restored into it next)."""
        self._partitions[partition] = _Partition()

    def drop(self, partitions: Iterable[int]) -> None:
        """Forget partitions this process no longer owns."""
        for partition in partitions:
            self._partitions.pop(partition, None)

    @property
    def partitions(self) -> list[int]:
        return sorted(self._partitions)

    def __len__(self) -> int:
        """Keys held, over every partition."""
        return sum(len(p.values) + len(p.raw) for p in self._partitions.values())

    def values(self, partition: int) -> dict[str, V]:
        """The partition's values, all decoded (live: for reading and for tests)."""
        part = self._partitions[partition]
        self._decode_all(partition, part)
        return part.values

    def _decode(self, partition: int, key: str, data: bytes) -> V:
        try:
            return self.codec.decode(data)
        except ValueError as exc:
            raise StateCorruptError(
                f"store {self.name!r}, partition {partition}, key {key!r}: the value restored "
                f"from the changelog cannot be read ({exc}); was the changelog written by another "
                "program or a newer version?"
            ) from exc

    def _decode_all(self, partition: int, part: _Partition[V]) -> None:
        for key, data in part.raw.items():
            part.values[key] = self._decode(partition, key, data)
        part.raw.clear()

    # -- the hot path --------------------------------------------------------------------------

    def checkout(self, partitions: Sequence[int], keys: Sequence[str]) -> dict[str, V]:
        """The values of `keys` (key i of partition i), as one dict to read and update in place.

        Every key is marked changed; keys without a value are absent from the dict, and a value
        the caller adds for them is taken in by `checkin`. Raises `KeyError` for a partition not
        assigned.
        """
        view: dict[str, V] = {}
        parts = self._partitions
        if partitions and partitions.count(partitions[0]) == len(partitions):
            partition = partitions[0]
            return self._checkout_one(partition, parts[partition], keys)
        keep_undo = self._keep_undo
        copy = self.codec.copy
        encode = self.codec.encode
        for partition, key in zip(partitions, keys, strict=True):
            if key in view:
                continue
            part = parts[partition]
            value = part.values.get(key)
            if value is None and part.raw:
                data = part.raw.pop(key, None)
                if data is not None:
                    value = part.values[key] = self._decode(partition, key, data)
            if part.snapshot and key in part.snapshot:
                # Copy on write: the snapshot takes the value before this batch changes it.
                part.snapshot.discard(key)
                part.snapshot_written.append((key, None if value is None else encode(value)))
            if key not in part.changed:
                part.changed.add(key)
                if keep_undo:
                    part.undo[key] = None if value is None else copy(value)
            if value is not None:
                view[key] = value
        return view

    def _checkout_one(
        self, partition: int, part: _Partition[V], keys: Sequence[str]
    ) -> dict[str, V]:
        """`checkout` of keys all of one partition: set and dict operations over the whole
        batch instead of a Python step per key (taken only by the keys that are decoded, copied
        for undo or written to the snapshot).
        """
        values = part.values
        if part.raw:
            raw = part.raw
            for key in filter(raw.__contains__, keys):
                values[key] = self._decode(partition, key, raw.pop(key))
        if part.snapshot:
            # Copy on write: the snapshot takes the value before this batch changes it.
            snapshot, written, encode = part.snapshot, part.snapshot_written, self.codec.encode
            for key in filter(snapshot.__contains__, keys):
                snapshot.discard(key)
                value = values.get(key)
                written.append((key, None if value is None else encode(value)))
        unique = set(keys)
        if self._keep_undo:
            undo, copy = part.undo, self.codec.copy
            for key in unique.difference(part.changed):
                value = values.get(key)
                undo[key] = None if value is None else copy(value)
        part.changed.update(unique)
        get: Callable[[str], V | None] = values.get
        view = dict(zip(keys, map(get, keys), strict=True))
        for key in unique.difference(values):
            del view[key]
        return cast("dict[str, V]", view)  # None only for the keys just deleted

    def checkin(
        self,
        view: dict[str, V],
        partitions: Sequence[int],
        keys: Sequence[str],
        positions: dict[int, int],
        stream_times: dict[int, int],
    ) -> None:
        """Take in the values `checkout` gave (and any the caller added) for `keys`.

        `positions`: each partition's next input offset after the records just applied;
        `stream_times`: the latest event time among them, per partition.
        """
        parts = self._partitions
        if partitions and partitions.count(partitions[0]) == len(partitions):
            # Every key of the view is of this partition (the one-step `checkout`).
            parts[partitions[0]].values.update(view)
        else:
            for partition, key in zip(partitions, keys, strict=True):
                value = view.get(key)
                if value is not None:
                    parts[partition].values[key] = value
        for partition, position in positions.items():
            part = parts[partition]
            part.position = position
            part.stream_time = max(part.stream_time, stream_times.get(partition, 0))

    # -- commit, rollback, expiry --------------------------------------------------------------

    def expire(self, partition: int, lateness: int = 0) -> int:
        """Delete the partition's values that `codec.expired` at its stream time less `lateness`
        (ms); how many. A whole sweep at once: `begin_sweep` and `sweep` spread one over calls.

        A record whose event time is up to `lateness` behind the partition's newest then still
        meets its key's value, whether or not a sweep ran before it: expiry changes nothing a
        record sees, wherever a restart or a batch boundary puts the sweep.
        """
        self.begin_sweep(partition, lateness)
        return self.sweep(partition)

    def begin_sweep(self, partition: int, lateness: int = 0) -> None:
        """Start a sweep of the partition's keys for values expired at its stream time less
        `lateness` (ms), as now; `sweep` looks at them a slice at a time.

        Records may go on between slices: a key is judged when its slice comes, at the stream
        time of this call, and a key added meanwhile waits for the next sweep.
        """
        part = self._partitions[partition]
        part.sweep = [*part.values, *part.raw]
        part.sweep_at = part.stream_time - lateness

    def sweeping(self, partition: int) -> bool:
        """Whether the partition has a sweep under way with keys left to look at."""
        return bool(self._partitions[partition].sweep)

    def sweep(self, partition: int, limit: int | None = None) -> int:
        """Look at up to `limit` keys of the partition's sweep (None: the rest) and delete the
        expired ones; how many were deleted.

        A restored value is judged from its bytes (`codec.expired_encoded`), not decoded. A
        deleted key is a change like any other (a tombstone in the next changelog write, undone
        by `rollback`); one the snapshot under way has not encoded yet is encoded first.
        """
        part = self._partitions[partition]
        keys = part.sweep
        if limit is None or limit >= len(keys):
            taken, part.sweep = keys, []
        else:
            taken = keys[-limit:]
            del keys[-limit:]
        values, raw, now = part.values, part.raw, part.sweep_at
        expired, expired_encoded = self.codec.expired, self.codec.expired_encoded
        gone = []
        for key in taken:
            value = values.get(key)
            if value is not None:
                if expired(value, now):
                    gone.append(key)
            else:
                data = raw.get(key)
                if data is not None and expired_encoded(data, now):
                    gone.append(key)
        for key in gone:
            self._delete(partition, part, key)
        return len(gone)

    def _delete(self, partition: int, part: _Partition[V], key: str) -> None:
        value = part.values.pop(key, None)
        data = part.raw.pop(key, None) if value is None else None
        if part.snapshot and key in part.snapshot:
            # Copy on write, as `checkout` does: the snapshot takes the value before it goes.
            part.snapshot.discard(key)
            part.snapshot_written.append((key, data if value is None else self.codec.encode(value)))
        if key not in part.changed:
            part.changed.add(key)
            if self._keep_undo:
                if value is None and data is not None:
                    value = self._decode(partition, key, data)
                part.undo[key] = value

    def changes(self, partition: int) -> list[tuple[str, bytes | None]]:
        """Each key changed since the last commit, with its encoded value (None: deleted)."""
        part = self._partitions[partition]
        encode = self.codec.encode
        values = part.values
        changes: list[tuple[str, bytes | None]] = []
        for key in part.changed:
            value = values.get(key)
            changes.append((key, part.raw.get(key) if value is None else encode(value)))
        return changes

    # -- snapshots: the changes written a slice at a time while records go on ---------------

    def begin_snapshot(self) -> dict[int, int]:
        """Take the changes since the last snapshot as a snapshot; the position of each partition.

        Its values are as at this call: `snapshot_slice` encodes them a few at a time, and a
        record that would change one first has it encoded by `checkout` (copy on write), so the
        scoring of later records need not wait for the whole snapshot to be encoded. The previous
        snapshot must be finished (`snapshot_pending` false). Not with `keep_undo`: a snapshot
        is never rolled back.
        """
        if self._keep_undo:
            raise RuntimeError("a store that keeps undo commits by `changes` and `commit`")
        if self.snapshot_pending:
            raise RuntimeError("the previous snapshot is not written yet")
        positions: dict[int, int] = {}
        for partition, part in self._partitions.items():
            if part.position is None:
                continue
            positions[partition] = part.position
            part.snapshot, part.changed = part.changed, part.snapshot
        return positions

    def snapshot_slice(self, limit: int) -> list[tuple[int, str, bytes | None]]:
        """Up to about `limit` encoded values of the snapshot as (partition, key, value or None).

        Values `checkout` encoded come first (they do not count against `limit`).
        """
        encode = self.codec.encode
        taken: list[tuple[int, str, bytes | None]] = []
        for partition, part in self._partitions.items():
            if part.snapshot_written:
                taken.extend((partition, key, value) for key, value in part.snapshot_written)
                part.snapshot_written.clear()
        for partition, part in self._partitions.items():
            snapshot, values, raw = part.snapshot, part.values, part.raw
            while snapshot and limit > 0:
                key = snapshot.pop()
                value = values.get(key)
                taken.append((partition, key, raw.get(key) if value is None else encode(value)))
                limit -= 1
        return taken

    @property
    def snapshot_size(self) -> int:
        """Values of the snapshot `snapshot_slice` has not given yet."""
        return sum(
            len(part.snapshot) + len(part.snapshot_written) for part in self._partitions.values()
        )

    @property
    def snapshot_pending(self) -> bool:
        """Whether the snapshot has values `snapshot_slice` has not given yet."""
        return any(part.snapshot or part.snapshot_written for part in self._partitions.values())

    def stream_time(self, partition: int) -> int:
        """The latest event time (ms) applied in `partition` since it was assigned."""
        return self._partitions[partition].stream_time

    def position(self, partition: int) -> int | None:
        """The next input offset of `partition` the state covers (None: nothing applied)."""
        return self._partitions[partition].position

    def positions(self) -> dict[int, int]:
        """`position` of every partition that has one."""
        return {
            p: part.position for p, part in self._partitions.items() if part.position is not None
        }

    def commit(self, partitions: Iterable[int] | None = None) -> None:
        """What `changes` gave is now in the changelog and committed: start a new change set."""
        chosen = self._partitions.keys() if partitions is None else partitions
        for partition in list(chosen):
            part = self._partitions.get(partition)
            if part is None:
                continue
            part.changed.clear()
            part.undo.clear()
            part.committed_position = part.position

    def rollback(self) -> None:
        """Return every partition to its state at the last commit (needs `keep_undo`)."""
        if not self._keep_undo:
            raise RuntimeError("this store keeps no undo; it cannot roll back")
        for part in self._partitions.values():
            for key, value in part.undo.items():
                if value is None:
                    part.values.pop(key, None)
                else:
                    part.values[key] = value
            part.changed.clear()
            part.undo.clear()
            part.position = part.committed_position

    # -- restore -------------------------------------------------------------------------------

    def restore(self, partition: int, records: Sequence[tuple[bytes, bytes | None]]) -> None:
        """Apply changelog records in log order: (UTF-8 key, value or None for a tombstone).

        A value is kept as bytes and decoded when its key is first used."""
        part = self._partitions[partition]
        raw, values = part.raw, part.values
        if values:
            for key, _ in records:
                values.pop(key.decode(), None)
        for key, value in records:
            if value is None:
                raw.pop(key.decode(), None)
            else:
                raw[key.decode()] = value

    def restored(self, partition: int, position: int | None) -> None:
        """The partition's changelog is read: its state covers input offsets before `position`."""
        part = self._partitions[partition]
        part.position = part.committed_position = position
