"""The TensorFlow Serving side: session loader, warmup records, local server, client.

Never imports training code (`pipelines/`); it runs SavedModels the way
`tensorflow_model_server` does, through the TF1 session loader.
"""
