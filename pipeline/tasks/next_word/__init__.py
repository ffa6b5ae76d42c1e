"""Next-word prediction: a causal language model over a text corpus, evaluated by
perplexity, served with top-k next words and generation."""
