"""Our C kernels for CPU decode steps (kernels.c) and their ctypes binding."""
