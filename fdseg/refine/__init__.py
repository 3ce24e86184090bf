"""Refinement of a coarse mask with region candidates (FM-SAM): fusion rules + region proposers.

    from fdseg.refine import refine, create_proposer
    refined = refine(prediction, create_proposer("superpixel").propose(image))
"""
from .fusion import FusionRules, deoverlap, refine, select
from .proposers import PROPOSERS, Proposer, create_proposer, list_proposers, register_proposer
from .refiner import Refiner

__all__ = ["FusionRules", "PROPOSERS", "Proposer", "Refiner", "create_proposer", "deoverlap", "list_proposers",
           "refine", "register_proposer", "select"]
