"""Storage: the schema, where a store is, writing it with the commit protocol, and the writer pipeline.

``schema``, ``location``, ``lock`` and ``ranks`` are what the read side needs and import no torch;
``writer`` and ``direct`` write numpy arrays; ``pipeline`` and ``buffers`` take torch tensors from a
capture to the store.
"""
