"""`mmdgen demo`: the whole system end to end on a small slice of the corpus (``run``), its configuration
(``config``) and its evaluation and report (``report``, also ``mmdgen eval report``)."""
