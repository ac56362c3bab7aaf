"""Speed machinery that computes the same function faster: CUDA graphs of whole steps, compiled blocks, merged and
Fourier-transform convolutions. Model files hold the method; this package is applied to a built model."""
