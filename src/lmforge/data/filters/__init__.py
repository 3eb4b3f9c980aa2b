"""Document filters of your own: every module here is loaded when the step registry is.

A filter is one module defining a :class:`~lmforge.data.stages.ChunkFilter` decorated with
:func:`~lmforge.data.stages.register_step`, for example ``filters/too_many_digits.py``::

    from lmforge.data.stages import ChunkFilter, register_step
    from lmforge.data.steps import FilterStep

    class TooManyDigits(FilterStep):
        name = "too_many_digits"

        def __init__(self, limit: float):
            super().__init__()
            self.limit = limit

        def reason(self, doc):
            digits = sum(c.isdigit() for c in doc.text)
            return "too_many_digits" if digits > self.limit * len(doc.text) else None

    @register_step
    class TooManyDigitsStep(ChunkFilter):
        name = "too_many_digits"

        def settings(self, ctx, source):
            return 0.3  # what the decisions depend on: a change redoes the step

        def make_filter(self, ctx, source):
            return TooManyDigits(0.3)

and one line of config: its name in ``data.steps``, anywhere after ``read`` and before
``tokenizer`` (say, after ``quality``). Its removals appear in the manifest per source
as ``removed_too_many_digits`` (by reason) and in the ``steps`` list.
"""
