"""The prediction log: what the service answered, and the labels users sent back.

One module per job, and no re-exports here, so that importing one (the settings' URL
check, the pipeline's reader, the normaliser's child process) does not import the
service's writer: `store` (schema, URLs, one connection), `stats` (the live figures),
`rows` (sampling, the rows of an answer), `normalizer` (normalising off the GIL),
`feedback` (storing labels), `crypto` (encryption at rest: keys, cipher, rotation),
`writer` (`PredictionLog`, the service's queue and thread) and `reader`
(`read_labelled`, for the pipeline).
"""
