"""The suite runs on 2 pytest-xdist workers (pyproject's addopts) and its end-to-end runs use one thread each: torch in a
worker uses one thread too, so that two workers never compete for the cores with spinning OpenMP threads."""
import torch

torch.set_num_threads(1)
