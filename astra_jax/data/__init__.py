"""Data: FITS readers, preprocessing, the mock survey, the `astropixel` tfds builder, tf.data."""

#: The features of a batch that go to the devices (ids and coordinates stay on the host).
MODEL_KEYS = ("image", "aperture_fluxes", "fiber_diameter", "flux", "weight", "z", "has_z")
