"""tf.data input pipelines and the scripts that train, evaluate, export and push."""
