"""Sigmoid-attention operators: public functions, reference twin and Triton kernels."""
