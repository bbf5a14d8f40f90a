"""ASTRA-JAX: reconstruct a galaxy's optical spectrum and redshift from multi-band images.

Units everywhere: flux densities in 1e-17 erg/s/cm^2/Angstrom, wavelengths in Angstrom
(vacuum, observed frame), images in linear flux as Pan-STARRS1 stack cutouts store them.
"""

__version__ = "0.1.0"
