"""deflect: adversarially-disjoint model sets, random deployment, deflected attacks."""

from deflect.config import TrainConfig, make_config
from deflect.data import load_dataset
from deflect.errors import DeflectError
from deflect.sets import load_set
from deflect.store import Store
from deflect.train import train

__all__ = ["DeflectError", "Store", "TrainConfig", "load_dataset", "load_set", "make_config", "train"]
