import os

from twisted.internet import defer

from shared.reserve import FileReserve


def inline(fn, *args):
    return defer.maybeDeferred(fn, *args)


def test_take_hands_out_precreated_files_and_refills(tmp_path):
    calls = []

    def run(fn, *args):
        calls.append(fn)
        return inline(fn, *args)
    r = FileReserve(tmp_path, run, size=4)
    fd, path = r.take()                  # empty reserve: filled, then one handed out
    assert len(calls) == 1 and os.path.dirname(path) == str(tmp_path)
    os.write(fd, b"x")
    os.close(fd)
    assert len(os.listdir(tmp_path)) == 4           # 3 in reserve + the one taken
    assert r.names() == set(os.listdir(tmp_path)) - {os.path.basename(path)}
    for _ in range(2):
        os.close(r.take()[0])
    assert len(calls) == 2                          # fell to half: refilled
    r.close()
    assert len(os.listdir(tmp_path)) == 3           # only the three taken files remain


def test_dry_reserve_creates_in_place_while_a_fill_is_pending(tmp_path):
    pending = []

    def run(fn, *args):
        d = defer.Deferred()
        pending.append((d, fn))
        return d
    r = FileReserve(tmp_path, run, size=4)
    fd, path = r.take()
    assert os.path.exists(path) and pending        # made in place; a fill is under way
    os.close(fd)
    d, fn = pending.pop()
    r.close()
    d.callback(fn())                               # the fill lands after close: its files go
    assert os.listdir(tmp_path) == [os.path.basename(path)]
