"""Which parameters get weight decay and which get AGC, chosen by role (NFNET_SPEC §3).

The official recipe (exp_nf.py ``_make_opt``) has three groups:

=================  =======================================================  ======  =====
role               parameters                                                decay   AGC
=================  =======================================================  ======  =====
``classifier``     the final classifier's weight                              on      off
``weights``        every other ``weight`` with ndim >= 2: stem, block, SE,    on      on
                   shortcut and final convs, SE linears
``gains_biases``   everything else: conv ``gain``/``bias``, ``skip_gain``,    off     on
                   linear biases (the classifier bias included)
=================  =======================================================  ======  =====

Roles come from the module a parameter belongs to and its local name, never from its
position in ``model.parameters()`` (timm's ``[:-2]`` hack, PRIOR_ART §1.3) and never from its
shape alone (a ``(O, 1, 1, 1)`` gain is still a gain, PRIOR_ART §1.2). Frozen parameters
(``requires_grad=False``) are left out of every group.
"""

from __future__ import annotations

from torch import nn

CLASSIFIER = "classifier"
WEIGHTS = "weights"
GAINS_BIASES = "gains_biases"
ROLES = (WEIGHTS, CLASSIFIER, GAINS_BIASES)

# Which roles are decayed and clipped (NFNET_SPEC §3, "Parameter groups").
DECAYED_ROLES = frozenset({WEIGHTS, CLASSIFIER})
AGC_ROLES = frozenset({WEIGHTS, GAINS_BIASES})

NamedParams = list[tuple[str, nn.Parameter]]


def _classifier_of(model: nn.Module, classifier: nn.Module | None) -> nn.Module:
    if classifier is not None:
        return classifier
    head = getattr(model, "classifier", None)
    if not isinstance(head, nn.Module):
        raise AttributeError(
            f"{type(model).__name__} has no `.classifier` module; AGC exempts the classifier "
            "weight by role, so expose the final nn.Linear as `model.classifier` or pass "
            "`classifier=` explicitly."
        )
    return head


def parameter_roles(
    model: nn.Module, classifier: nn.Module | None = None
) -> dict[str, NamedParams]:
    """Trainable parameters of ``model`` by role: ``{role: [(qualified_name, param), ...]}``.

    ``classifier`` defaults to ``model.classifier``. Every role key is present (possibly
    empty). A parameter shared between modules is listed once, under its first name.
    """
    head = _classifier_of(model, classifier)
    roles: dict[str, NamedParams] = {role: [] for role in ROLES}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for local_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            if not param.requires_grad:
                continue
            name = f"{module_name}.{local_name}" if module_name else local_name
            if module is head and local_name == "weight":
                role = CLASSIFIER
            elif local_name == "weight" and param.ndim >= 2:
                role = WEIGHTS
            else:
                role = GAINS_BIASES
            roles[role].append((name, param))
    return roles


def optimizer_param_groups(
    model: nn.Module, weight_decay: float, classifier: nn.Module | None = None
) -> list[dict]:
    """Parameter groups for ``torch.optim.SGD`` with coupled weight decay by role.

    SGD's per-group ``weight_decay`` adds ``weight_decay * param`` to the gradient inside
    ``step()``, i.e. after AGC has edited ``.grad``: the official order (NFNET_SPEC §3).
    Each group carries a ``role`` key; empty roles are left out.
    """
    groups = []
    for role, named in parameter_roles(model, classifier).items():
        if named:
            groups.append(
                {
                    "params": [param for _, param in named],
                    "weight_decay": weight_decay if role in DECAYED_ROLES else 0.0,
                    "role": role,
                }
            )
    return groups


def agc_named_parameters(model: nn.Module, classifier: nn.Module | None = None) -> NamedParams:
    """``(name, param)`` for every trainable parameter AGC clips: all but the classifier weight."""
    roles = parameter_roles(model, classifier)
    named = [item for role in ROLES if role in AGC_ROLES for item in roles[role]]
    # Keep model order, so telemetry groups and plans follow the network from stem to head.
    order = {id(param): i for i, (_, param) in enumerate(model.named_parameters())}
    return sorted(named, key=lambda item: order.get(id(item[1]), len(order)))


def agc_parameters(model: nn.Module, classifier: nn.Module | None = None) -> list[nn.Parameter]:
    """Every trainable parameter AGC clips: all but the classifier weight (NFNET_SPEC §3)."""
    return [param for _, param in agc_named_parameters(model, classifier)]


def stage_of(name: str) -> str:
    """Telemetry group of an NFNet parameter name: ``stem``, ``stage0``..``stage3``, ``final_conv``,
    ``classifier``; any other name is grouped by its first component."""
    parts = name.split(".")
    if parts[0] == "stages" and len(parts) > 1:
        return f"stage{parts[1]}"
    return parts[0]
