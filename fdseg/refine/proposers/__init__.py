from .registry import PROPOSERS, Proposer, create_proposer, list_proposers, proposer_entry, register_proposer

__all__ = ["PROPOSERS", "Proposer", "create_proposer", "list_proposers", "proposer_entry", "register_proposer"]
