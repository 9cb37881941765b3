"""CPython's iteration order of a set of small non-negative integers, computed explicitly.

The released Market-1501 / DukeMTMC-reID parsers label the training identities with
``{pid: label for label, pid in enumerate(set(pids))}``, so a label is the position of the
pid in the set's iteration order. :func:`set_order` reproduces that order from the pids in
the order they were added, independently of the interpreter running this code.

What determines the order. CPython hashes an int n (0 <= n < 2**61 - 1) to n itself and
iterates a set by hash-table slot, 0 upwards. A value goes to slot ``n & mask`` (the table
has ``mask + 1`` slots, a power of two, at least 8); when that slot is taken it probes the
next 9 slots too if they lie inside the table, then jumps to ``(5 * i + 1 + perturb) & mask``
with ``perturb`` starting at n and shifted right by 5 bits before every jump, and so on.
After an insertion that fills 3/5 of the table it is rebuilt with the smallest power of two
above 4 x the number of values (2 x above 50,000 values), re-inserting the values in their
old slot order. Hence:

* values that never share a slot are iterated in ascending order (Market-1501: every pid
  is below 2048 and the final table of its 751 pids has 4096 slots);
* values that collide (5 and 2053 share slot 5 of tables up to 2048 slots) are ordered by
  the order in which they were first added, so the same set of pids can give different
  labels for different file orders (DukeMTMC-reID, pids up to 7140).

``set_order([5, 12, 2053, 7140]) == [2053, 7140, 12, 5]`` while
``set_order([2053, 5, 7140, 12]) == [5, 12, 7140, 2053]``.
"""

_LINEAR_PROBES = 9
_PERTURB_SHIFT = 5
_MIN_SIZE = 8
_MAX_HASH = (1 << 61) - 1


def _insert(table, mask, value):
    """Slot of `value` in `table`: where it already is, or the free slot it goes to."""
    i = value & mask
    perturb = value
    while True:
        last = i + _LINEAR_PROBES if i + _LINEAR_PROBES <= mask else i
        for j in range(i, last + 1):
            if table[j] is None or table[j] == value:
                return j
        perturb >>= _PERTURB_SHIFT
        i = (i * 5 + 1 + perturb) & mask


def _rebuilt(table, used):
    size = _MIN_SIZE
    target = used * 2 if used > 50000 else used * 4
    while size <= target:
        size <<= 1
    new = [None] * size
    for value in table:
        if value is not None:
            new[_insert(new, size - 1, value)] = value
    return new


def set_order(values):
    """The iteration order of a CPython set built by adding `values` one by one.

    values: non-negative ints below 2**61 - 1 (their own hashes), repeats allowed, in the
    order they are added. Returns the distinct values in the set's iteration order.
    """
    table = [None] * _MIN_SIZE
    used = 0
    for value in values:
        value = int(value)
        if not 0 <= value < _MAX_HASH:
            raise ValueError("set_order needs non-negative ints below 2**61 - 1, got %d" % value)
        mask = len(table) - 1
        slot = _insert(table, mask, value)
        if table[slot] is None:
            table[slot] = value
            used += 1
            # No value is ever removed, so the table's fill equals the number of values.
            if used * 5 >= mask * 3:
                table = _rebuilt(table, used)
    return [v for v in table if v is not None]


def set_order_labels(values):
    """``{value: label}``: the position of each distinct value in :func:`set_order`."""
    return {v: i for i, v in enumerate(set_order(values))}
