"""A total teacher-query budget for a student's training data, and the plan that spends it.

Given Q queries and N real images (K classes), the plan buys, in this order (following
benchmarks/budget_frontier.py, MNIST and Fashion-MNIST with LeNet-5 teachers and `lenet5-half` students):

1. the teacher's top-1 label of every image (N queries; with Q < N, of the first Q images only);
2. BD soft labels (at most `queries_per_pair` queries for each of the K - 1 other classes, or the
   `classes_per_image` most plausible ones) of as many images as the rest pays for: when not all, those a
   selector student (trained on the labels of step 1, no query) is least sure of, each search trying the
   selector's adversarial direction toward the class first (`db3kd.jobs.selection`, `db3kd.robustness.guide`).
   The student trains on those with the distillation loss and on every other image with its hard label;
3. what the soft labels cannot use (every image has them) in teacher-labelled mixtures of the images, one query
   each, at most `max_mixtures_per_image` per image: they show the student the teacher's decisions between the
   images, which pays when the images are few and costs accuracy when they are many.

Measured on MNIST at 1M queries: with all 60,000 images, 99.10% for this plan (5,222 selected images with guided
BD soft labels), 98.96% with half of the queries in mixtures instead (`mixture_share` 0.5), 99.13% for CE-only;
with 2,000 images, 98.29% for this plan (BD soft labels on all of them and 600,000 mixtures), 97.48% with at most
20 mixtures per image (600,000 queries left unspent). `mixture_share` buys mixtures before the soft labels.

The plan never costs more than Q: each part's cost is known or capped in advance (labels and mixtures exactly,
BD per pair). A recipe's `budget` turns into these stages (`Recipe.plan_budget`), recorded in the resolved
recipe and, with what each stage actually spent, in RUN_DIR/run.json.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from .checks import integer, number
from .errors import ConfigError


@dataclass
class BudgetSpec:
    """A recipe's `budget`.

    Args:
        queries: total teacher queries behind the students' training data (evaluation queries apart).
        queries_per_pair: BD's cap per (image, class) pair.
        mixture_share: the share of what is left after the labels that goes to mixtures before any soft label
            (default 0: soft labels first, mixtures with what they cannot use).
        max_mixtures_per_image: most mixtures per real image.
        select: which images get soft labels when not all can: "uncertain" (those a selector student trained on
            the labels is least sure of) or "first".
        classes_per_image: search only the selector's most plausible other classes of each image (None: all).
        guide: BD searches the selector's adversarial direction toward each class first.
        mixture_options: how the mixtures are drawn (`db3kd.jobs.mixtures.MixtureConfig`'s MIXTURE_OPTIONS, e.g.
            `{max_rotation: 15, max_scale: 0.1}`); their number is the plan's.
    """

    queries: int
    queries_per_pair: int = 20
    mixture_share: float = 0.0
    max_mixtures_per_image: int = 300
    select: str = "uncertain"
    classes_per_image: int | None = None
    guide: bool = True
    mixture_options: dict = field(default_factory=dict)

    def __post_init__(self):
        from .jobs.mixtures import MIXTURE_OPTIONS, MixtureConfig
        from .jobs.selection import SELECTIONS

        integer(self.queries, "queries", 1)
        integer(self.queries_per_pair, "queries_per_pair", 1)
        number(self.mixture_share, "mixture_share", 0, 1, closed="both")
        integer(self.max_mixtures_per_image, "max_mixtures_per_image", 0)
        if self.select not in SELECTIONS:
            raise ConfigError(f"select must be one of {', '.join(SELECTIONS)}, got {self.select!r}")
        if self.classes_per_image is not None:
            integer(self.classes_per_image, "classes_per_image", 1)
        if not isinstance(self.guide, bool):
            raise ConfigError(f"guide must be true or false, got {self.guide!r}")
        unknown = sorted(set(self.mixture_options) - set(MIXTURE_OPTIONS))
        if unknown:
            raise ConfigError(f"mixture_options: unknown option {unknown[0]!r}; expected some of "
                              f"{', '.join(MIXTURE_OPTIONS)}")
        try:
            MixtureConfig(count=2**31, **self.mixture_options)  # the count is the plan's: a large one fits any rounds
        except ConfigError as e:
            raise ConfigError(f"mixture_options: {e}") from None


@dataclass(frozen=True)
class BudgetPlan:
    """How a budget is spent: `labelled` images with top-1 labels, `mixtures`, and `soft_labelled` of the
    images with BD soft labels at `queries_per_pair`; `at_most` is the most it can cost."""

    budget: int
    labelled: int
    mixtures: int
    soft_labelled: int
    queries_per_pair: int
    classes: int
    classes_per_image: int | None = None  # classes searched per soft-labelled image (None: every other class)
    select: str = "first"  # which images get soft labels when not all do (db3kd.jobs.selection)
    guide: bool = False  # BD searches a selector student's adversarial directions first

    @property
    def at_most(self) -> int:
        return self.labelled + self.mixtures + self.soft_labelled * self.pair_cost

    @property
    def pair_cost(self) -> int:
        """The most a soft-labelled image costs."""
        return (self.classes_per_image or self.classes - 1) * self.queries_per_pair

    def to_dict(self) -> dict:
        return {**asdict(self), "at_most": self.at_most}

    @classmethod
    def from_dict(cls, data: dict) -> BudgetPlan:
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})

    def describe(self) -> str:
        """The plan in words, e.g. for `db3kd run` and the report."""
        which = {"first": "the first", "uncertain": "the"}[self.select]
        chosen = " a selector student is least sure of" if self.select == "uncertain" else ""
        toward = f"toward the {self.classes_per_image} most plausible other classes" if self.classes_per_image \
            else "toward every other class"
        guided = ", the selector's adversarial direction searched first" if self.guide else ""
        soft = (f", BD soft labels for {which} {self.soft_labelled:,} of them{chosen}, {toward}, at <= "
                f"{self.queries_per_pair} queries per pair{guided}") if self.soft_labelled else ", no soft labels"
        return (f"{self.budget:,} teacher queries planned as: labels for {self.labelled:,} images, {self.mixtures:,} "
                f"mixtures of them{soft} (at most {self.at_most:,} in all)")


def plan_budget(spec: BudgetSpec, images: int, classes: int) -> BudgetPlan:
    """The plan for `spec.queries` over `images` real images of `classes` classes."""
    integer(images, "images", 1)
    q, labelled = spec.queries, min(images, spec.queries)
    left = q - labelled
    if spec.classes_per_image is not None and spec.classes_per_image >= classes:
        raise ConfigError(f"classes_per_image must be at most {classes - 1} (the other classes), got "
                          f"{spec.classes_per_image}")
    pair_cost = (spec.classes_per_image or classes - 1) * spec.queries_per_pair
    mixtures = min(int(left * spec.mixture_share), spec.max_mixtures_per_image * labelled)
    soft = min(labelled, (left - mixtures) // pair_cost)
    # What the soft labels cannot use (too few images) goes to mixtures, up to their cap.
    mixtures = min(left - soft * pair_cost, spec.max_mixtures_per_image * labelled)
    select = spec.select if 0 < soft < labelled else "first"
    return BudgetPlan(q, labelled, mixtures, soft, spec.queries_per_pair, classes, spec.classes_per_image, select,
                      spec.guide and soft > 0)
