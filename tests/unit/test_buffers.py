"""Host buffer pools (streamtap.io.buffers): a bounded number of sets, and memory that goes back."""

import threading
import time

import torch

from streamtap.io.buffers import BufferPool


def test_a_set_given_back_gives_back_the_late_set_it_holds():
    early, late = BufferPool(sets=2), BufferPool(sets=2)
    a = early.acquire()
    a.after = late.acquire()
    a.release()
    a.release()  # an error path releasing again changes nothing
    assert early.free.qsize() == 1 and late.free.qsize() == 1 and a.after is None


def test_a_set_given_back_while_another_is_in_use_lets_its_memory_go():
    # two sets are needed only while a batch's chunks are still being written as the next forward
    # starts; kept, the idle one would sit through every later forward's peak beside the one in use
    pool = BufferPool(sets=3, shed=True)
    a, b = pool.acquire(), pool.acquire()
    a.take("z", (4, 3), torch.float32)
    a.release()
    assert a.buffers == {} and pool.created == 1 and pool.free.empty()
    b.take("z", (4, 3), torch.float32)
    b.release()  # the last one in use: kept for the next batch
    assert pool.free.qsize() == 1 and pool.acquire() is b


def test_an_acquire_waiting_on_a_full_pool_gets_a_set_when_one_is_shed():
    pool = BufferPool(sets=2, shed=True)
    a, b = pool.acquire(), pool.acquire()
    got = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire()))
    waiter.start()
    time.sleep(0.05)
    assert not got  # the pool is at its bound
    a.release()  # shed (b is in use): room for a new set
    waiter.join(5)
    assert got and got[0] is not a and pool.created == 2
    b.release()
    got[0].release()
    assert pool.in_use == 0 and pool.free.qsize() == 1


def test_a_shed_sets_memory_is_gone_before_a_waiting_acquire_makes_a_new_one():
    # woken first, the producer would make its next set while the shed one still existed: one set
    # over the bound, for as long as the free takes (the back-pressure test saw four batches alive)
    pool = BufferPool(sets=2, shed=True)
    a, _b = pool.acquire(), pool.acquire()
    freed = threading.Event()

    class SlowToFree:
        def __del__(self):
            time.sleep(0.2)
            freed.set()

    a.buffers["z"] = SlowToFree()
    seen = []
    waiter = threading.Thread(target=lambda: (pool.acquire(), seen.append(freed.is_set())))
    waiter.start()
    time.sleep(0.05)
    a.release()
    waiter.join(5)
    assert seen == [True]
