"""The data stages, in the order a corpus goes through them.

1. ``download`` (with ``urls`` and ``corpus_stream``): fetch the corpus into a hash-checked cache and read it as
   a stream of checked text, in bounded memory.
2. ``normalize`` (with ``chunk_edges``): the rule that turns text into tokens, applied piece by piece.
   ``book_tokenize`` is the book's own rule (D2L 8.2), kept as the reference ``normalize`` must equal.
3. ``token_counts`` and ``vocab``: count the tokens and build the vocabulary.
4. ``prepare`` (with ``token_cache``): the token ids encoded once and kept on disk, verified on every read.
5. ``batching``: the ids split into train, validation and test and cut into minibatches.
"""
