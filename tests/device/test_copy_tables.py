"""The copy-list kernel's table pool (`ucm.backends.cuda.copy_tables`): a table the kernel may still be reading is
never handed out again; once its launch's event is done it is, so steady loads make no new (pinned) tables.
Host-only: the events are the pool's only device contact, here objects that say whether their work is done."""

from __future__ import annotations

from ucm.backends.cuda.copy_tables import MIN_ENTRIES, CopyTables


class LaunchEvent:
    """What the pool asks of a recorded event: whether the work before it is done."""

    def __init__(self) -> None:
        self.done = False

    def query(self) -> bool:
        return self.done


def test_a_table_is_reused_only_once_its_launch_is_done():
    tables = CopyTables(pinned=False)
    first = tables.take(300)
    assert first.numel() >= 300 and tables.made == 1
    pending = LaunchEvent()
    tables.give_back(first, pending)
    second = tables.take(300)
    assert second.data_ptr() != first.data_ptr() and tables.made == 2  # the first may still be read
    pending.done = True
    tables.give_back(second, LaunchEvent())
    assert tables.take(300).data_ptr() == first.data_ptr() and tables.made == 2


def test_sizes_grow_by_powers_of_two_and_a_small_table_is_not_given_for_a_large_list():
    tables = CopyTables(pinned=False)
    small = tables.take(10)
    assert small.numel() == MIN_ENTRIES
    done = LaunchEvent()
    done.done = True
    tables.give_back(small, done)
    big = tables.take(MIN_ENTRIES + 1)
    assert big.numel() == 2 * MIN_ENTRIES and tables.made == 2
    assert tables.take(5).data_ptr() == small.data_ptr()  # the small one, free, still serves small lists
