"""The machinery behind the ``validate`` stage: PHI screening, token bounds and the Great Expectations suite.

``day`` reads a day into columns, ``columns`` prepares them (normalisation, PHI masking, token counts), ``suite``
runs Great Expectations on them, with ``phi`` and ``tokens`` behind. Past reading, the work is done on whole
columns (pyarrow, pandas, one GX suite) rather than row by row in Python, because validation has to cost no more
than a few passes of plain JSON reading (benchmarks/validate.py).
"""
