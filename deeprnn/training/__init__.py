"""The training stage: the loop and what it is made of.

``loop`` (the ``Trainer``: the book's epochs and a fast path) runs ``step`` (one optimizer step), planned by
``schedule`` (budgets, learning rates, evaluations), watched by ``divergence``, ``selection`` (the best
evaluation) and ``stop_signals`` (signals as a normal stop), reporting through ``progress``. ``checkpoint`` is the
file a trainer's state goes into to continue bit for bit, ``resume`` how a run continues.
"""
