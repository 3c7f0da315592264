"""The keyed store: partitions, change sets, rollback, expiry and restore, on a toy value type."""

from __future__ import annotations

import json

import pytest

from streamer.state.store import KeyedStore, StateCodec, StateCorruptError

TOTALS: StateCodec[list[int]] = StateCodec(
    encode=lambda value: json.dumps(value).encode(),
    decode=lambda data: list(json.loads(data)),
    copy=list,
    expired=lambda value, now: value[-1] <= now - 100,
    expired_encoded=lambda data, now: int(data.rsplit(b",", 1)[-1].strip(b" []")) <= now - 100,
)
"""Values are lists of event times; a value idle for 100 time units expires."""


def _apply(store: KeyedStore[list[int]], partition: int, key: str, time: int, offset: int) -> None:
    view = store.checkout([partition], [key])
    view.setdefault(key, []).append(time)
    store.checkin(view, [partition], [key], {partition: offset + 1}, {partition: time})


@pytest.fixture
def store() -> KeyedStore[list[int]]:
    store: KeyedStore[list[int]] = KeyedStore("totals", TOTALS, keep_undo=True)
    store.assign(0)
    store.assign(1)
    return store


class TestChanges:
    def test_checkout_gives_one_dict_over_partitions(self, store: KeyedStore[list[int]]) -> None:
        """Keys of several partitions come back in one view, and go back where they belong."""
        _apply(store, 0, "a", 1, 0)
        _apply(store, 1, "b", 2, 0)
        view = store.checkout([0, 1, 0], ["a", "b", "c"])
        assert view == {"a": [1], "b": [2]}
        view["c"] = [3]
        store.checkin(view, [0, 1, 0], ["a", "b", "c"], {0: 5, 1: 1}, {0: 3})
        assert store.values(0) == {"a": [1], "c": [3]}
        assert store.values(1) == {"b": [2]}
        assert store.position(0) == 5

    def test_changes_name_each_key_written_since_commit(self, store: KeyedStore[list[int]]) -> None:
        """Only keys touched since the last commit are in the change set, encoded."""
        _apply(store, 0, "a", 1, 0)
        store.commit()
        _apply(store, 0, "b", 2, 1)
        assert store.changes(0) == [("b", b"[2]")]
        assert store.changes(1) == []

    @pytest.mark.parametrize("keep_undo", [True, False])
    def test_a_batch_of_one_partition_is_taken_as_one_of_several(self, keep_undo: bool) -> None:
        """Keys all of one partition (checked out in one step) leave that partition as they do
        in a batch with a key of another: restored bytes decoded, copy on write, undo, a key
        twice and a key without a value."""
        keys = ["a", "b", "a", "new"]
        stores = []
        for others in ([], ["other"]):
            store: KeyedStore[list[int]] = KeyedStore("totals", TOTALS, keep_undo=keep_undo)
            store.assign(0)
            store.assign(1)
            store.restore(0, [(b"a", b"[1]"), (b"b", b"[2]"), (b"c", b"[3]")])
            store.restored(0, 3)
            _apply(store, 0, "a", 4, 3)
            _apply(store, 1, "other", 5, 0)
            if keep_undo:
                store.commit()
            else:
                store.begin_snapshot()
            partitions = [0] * len(keys) + [1] * len(others)
            view = store.checkout(partitions, keys + others)
            assert view == {"a": [1, 4], "b": [2], **{key: [5] for key in others}}
            for key in view.keys() | {"new"}:
                view.setdefault(key, []).append(10)
            store.checkin(view, partitions, keys + others, {0: 5}, {0: 10})
            stores.append(store)
        one, several = stores
        assert one.values(0) == several.values(0)
        assert one.values(0) == {"a": [1, 4, 10], "b": [2, 10], "c": [3], "new": [10]}
        assert sorted(one.changes(0)) == sorted(several.changes(0))
        if keep_undo:
            for store in stores:
                store.rollback()
            assert one.values(0) == several.values(0) == {"a": [1, 4], "b": [2], "c": [3]}
        else:
            first, second = (
                sorted(item for item in store.snapshot_slice(10) if item[0] == 0)
                for store in stores
            )
            assert first == second == [(0, "a", b"[1, 4]")]

    def test_unassigned_partition_is_an_error(self, store: KeyedStore[list[int]]) -> None:
        """A key of a partition not assigned cannot be checked out."""
        with pytest.raises(KeyError):
            store.checkout([7], ["a"])


class TestRollback:
    def test_rollback_returns_to_the_last_commit(self, store: KeyedStore[list[int]]) -> None:
        """Changed values, added keys and positions go back to what was committed."""
        _apply(store, 0, "a", 1, 0)
        store.commit()
        _apply(store, 0, "a", 2, 1)
        _apply(store, 0, "b", 3, 2)
        store.rollback()
        assert store.values(0) == {"a": [1]}
        assert store.position(0) == 1
        assert store.changes(0) == []

    def test_without_undo_there_is_no_rollback(self) -> None:
        """An at-least-once store keeps no undo and refuses to roll back."""
        store: KeyedStore[list[int]] = KeyedStore("totals", TOTALS, keep_undo=False)
        with pytest.raises(RuntimeError):
            store.rollback()


class TestExpiry:
    def test_idle_keys_expire_as_deletes(self, store: KeyedStore[list[int]]) -> None:
        """A key idle past its codec's limit is deleted; the delete is a change (a tombstone)."""
        _apply(store, 0, "old", 1, 0)
        _apply(store, 0, "new", 150, 1)
        store.commit()
        assert store.expire(0) == 1
        assert store.values(0) == {"new": [150]}
        assert store.changes(0) == [("old", None)]
        store.rollback()
        assert store.values(0) == {"old": [1], "new": [150]}

    def test_lateness_keeps_what_a_late_record_may_still_meet(
        self, store: KeyedStore[list[int]]
    ) -> None:
        """Expiry measured from the stream time less the allowed lateness keeps younger keys."""
        _apply(store, 0, "old", 1, 0)
        _apply(store, 0, "new", 150, 1)
        assert store.expire(0, lateness=60) == 0
        assert store.expire(0, lateness=40) == 1

    def test_a_sweep_goes_a_slice_at_a_time(self, store: KeyedStore[list[int]]) -> None:
        """`sweep` looks at `limit` keys a call, at the stream time its sweep began; a key
        added meanwhile waits for the next sweep, and records go on between slices."""
        for offset in range(10):
            _apply(store, 0, f"old-{offset}", offset, offset)
        _apply(store, 0, "new", 150, 10)
        store.begin_sweep(0)
        deleted = []
        while store.sweeping(0):
            deleted.append(store.sweep(0, limit=4))
            _apply(store, 0, "added", 1, 11)  # judged by the next sweep, not this one
        assert len(deleted) == 3
        assert sum(deleted) == 10
        assert set(store.values(0)) == {"new", "added"}
        assert store.expire(0) == 1
        assert set(store.values(0)) == {"new"}

    def test_a_sweep_judges_restored_values_without_decoding_them(self) -> None:
        """A restored value no record used yet is judged from its bytes, never decoded."""
        decoded: list[bytes] = []

        def decode(data: bytes) -> list[int]:
            decoded.append(data)
            return list(json.loads(data))

        codec = StateCodec(
            encode=TOTALS.encode,
            decode=decode,
            copy=list,
            expired=TOTALS.expired,
            expired_encoded=TOTALS.expired_encoded,
        )
        store: KeyedStore[list[int]] = KeyedStore("totals", codec, keep_undo=False)
        store.assign(0)
        store.restore(0, [(b"old", b"[1, 2]"), (b"new", b"[140, 150]")])
        store.restored(0, 2)
        _apply(store, 0, "other", 150, 2)
        decoded.clear()
        assert store.expire(0) == 1
        assert decoded == []
        assert sorted(store.changes(0)) == [("old", None), ("other", b"[150]")]
        assert set(store.values(0)) == {"new", "other"}

    def test_a_deleted_restored_value_is_rolled_back(self, store: KeyedStore[list[int]]) -> None:
        """Exactly-once: a restored value a sweep deletes comes back, decoded, on rollback."""
        store.restore(0, [(b"old", b"[1]")])
        store.restored(0, 1)
        _apply(store, 0, "new", 150, 1)
        store.commit()
        assert store.expire(0) == 1
        store.rollback()
        assert store.values(0) == {"old": [1], "new": [150]}

    def test_a_sweep_leaves_the_snapshot_under_way_its_values(self) -> None:
        """At-least-once: a key the snapshot under way has not encoded yet is encoded before a
        sweep deletes it, so the snapshot holds the state as of its position."""
        store: KeyedStore[list[int]] = KeyedStore("totals", TOTALS, keep_undo=False)
        store.assign(0)
        _apply(store, 0, "old", 1, 0)
        _apply(store, 0, "new", 150, 1)
        assert store.begin_snapshot() == {0: 2}
        assert store.expire(0) == 1
        written = sorted(store.snapshot_slice(10))
        assert written == [(0, "new", b"[150]"), (0, "old", b"[1]")]
        assert store.changes(0) == [("old", None)]


class TestRestore:
    def test_restore_applies_values_and_tombstones(self, store: KeyedStore[list[int]]) -> None:
        """Changelog records replace values; a tombstone deletes; the position is as given."""
        store.assign(0)
        store.restore(0, [(b"a", b"[1]"), (b"b", b"[2]")])
        store.restore(0, [(b"a", None), ("\u00e9".encode(), b"[3]")])
        store.restored(0, 42)
        assert store.values(0) == {"b": [2], "\u00e9": [3]}
        assert store.position(0) == 42
        store.rollback()
        assert store.position(0) == 42

    def test_a_later_record_replaces_a_decoded_value(self, store: KeyedStore[list[int]]) -> None:
        """A partition read again from the start (its reader had to be reassigned) ends with
        the changelog's latest values, whether or not a value was decoded meanwhile."""
        store.restore(0, [(b"a", b"[1]"), (b"b", b"[2]")])
        assert store.checkout([0], ["a"]) == {"a": [1]}
        store.restore(0, [(b"a", b"[5]"), (b"b", None)])
        store.restored(0, 7)
        assert store.values(0) == {"a": [5]}

    def test_values_are_decoded_when_first_used(self, store: KeyedStore[list[int]]) -> None:
        """A restored value stays bytes until a record of its key needs it; unused, it is
        written back unchanged."""
        store.restore(0, [(b"a", b"[1]"), (b"b", b"[2]")])
        store.restored(0, 5)
        assert len(store) == 2
        view = store.checkout([0], ["a"])
        assert view == {"a": [1]}
        assert store.changes(0) == [("a", b"[1]")]

    def test_bad_bytes_stop_the_scorer_naming_the_key(self, store: KeyedStore[list[int]]) -> None:
        """Bytes the codec cannot read are an error, not a silent empty state."""
        store.restore(0, [(b"a", b"not json")])
        with pytest.raises(StateCorruptError, match="partition 0, key 'a'"):
            store.checkout([0], ["a"])


class TestSnapshot:
    @pytest.fixture
    def alos(self) -> KeyedStore[list[int]]:
        store: KeyedStore[list[int]] = KeyedStore("totals", TOTALS, keep_undo=False)
        store.assign(0)
        store.assign(1)
        return store

    def test_a_snapshot_takes_the_changes_with_their_positions(
        self, alos: KeyedStore[list[int]]
    ) -> None:
        """The changes since the last snapshot, a slice at a time; the next starts empty."""
        for offset, key in enumerate("abc"):
            _apply(alos, 0, key, offset, offset)
        _apply(alos, 1, "z", 9, 0)
        assert alos.begin_snapshot() == {0: 3, 1: 1}
        first = alos.snapshot_slice(2)
        assert len(first) == 2
        assert alos.snapshot_pending
        rest = alos.snapshot_slice(10)
        assert not alos.snapshot_pending
        assert sorted(first + rest) == [
            (0, "a", b"[0]"),
            (0, "b", b"[1]"),
            (0, "c", b"[2]"),
            (1, "z", b"[9]"),
        ]
        assert alos.begin_snapshot() == {0: 3, 1: 1}
        assert alos.snapshot_slice(10) == []

    def test_a_value_changed_meanwhile_is_written_as_it_was(
        self, alos: KeyedStore[list[int]]
    ) -> None:
        """Copy on write: a record that changes a value not written yet has the snapshot take
        it first, so the snapshot holds the state at its positions, and the change goes in the
        next snapshot; a value deleted meanwhile is written as it was too."""
        _apply(alos, 0, "a", 1, 0)
        _apply(alos, 0, "b", 2, 1)
        alos.begin_snapshot()
        _apply(alos, 0, "a", 3, 2)
        assert alos.snapshot_slice(0) == [(0, "a", b"[1]")]
        assert alos.snapshot_slice(10) == [(0, "b", b"[2]")]
        assert alos.begin_snapshot() == {0: 3}
        assert alos.snapshot_slice(10) == [(0, "a", b"[1, 3]")]

    def test_one_snapshot_at_a_time_and_never_with_undo(
        self, alos: KeyedStore[list[int]], store: KeyedStore[list[int]]
    ) -> None:
        _apply(alos, 0, "a", 1, 0)
        alos.begin_snapshot()
        with pytest.raises(RuntimeError, match="previous snapshot"):
            alos.begin_snapshot()
        with pytest.raises(RuntimeError, match="undo"):
            store.begin_snapshot()
