"""Data: FITS readers, preprocessing, the mock survey, the `astropixel` tfds builder, tf.data."""
