"""The training stage: the loop and what it is made of.

``loop`` (the ``Trainer``: the book's epochs and a fast path) runs ``step`` (one optimizer step), planned by
``schedule`` (budgets, learning rates, evaluations), watched by ``divergence``, ``selection`` (the best
evaluation) and ``stop_signals`` (signals as a normal stop), reporting through ``progress``. ``state`` is what a
trainer saves to continue bit for bit, ``checkpoint`` the file it goes into, ``resume`` how a run continues.
"""
