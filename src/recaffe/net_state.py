"""Which layers a net keeps for a NetState: Caffe's include/exclude rules on phase, level and stage."""
from __future__ import annotations

from .layer import LayerError
from .log import get_logger
from .proto import caffe_pb2

log = get_logger(__name__)


def state_meets_rule(state: caffe_pb2.NetState, rule: caffe_pb2.NetStateRule, layer_name: str) -> bool:
    if rule.HasField("phase") and rule.phase != state.phase:
        log.info("The NetState phase (%d) differed from the phase (%d) specified by a rule in layer %s",
                 state.phase, rule.phase, layer_name)
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        log.info("The NetState level (%d) is above the min_level (%d) specified by a rule in layer %s",
                 state.level, rule.min_level, layer_name)
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        log.info("The NetState level (%d) is above the max_level (%d) specified by a rule in layer %s",
                 state.level, rule.max_level, layer_name)
        return False
    for stage in rule.stage:
        if stage not in state.stage:
            log.info("The NetState did not contain stage '%s' specified by a rule in layer %s", stage, layer_name)
            return False
    for stage in rule.not_stage:
        if stage in state.stage:
            log.info("The NetState contained a not_stage '%s' specified by a rule in layer %s", stage, layer_name)
            return False
    return True


def filter_net(param: caffe_pb2.NetParameter) -> caffe_pb2.NetParameter:
    """A copy of ``param`` keeping only the layers that ``param.state`` includes."""
    out = caffe_pb2.NetParameter()
    out.CopyFrom(param)
    del out.layer[:]
    for layer in param.layer:
        if len(layer.include) and len(layer.exclude):
            raise LayerError(f"layer {layer.name!r}: specify either include rules or exclude rules; not both")
        included = len(layer.include) == 0
        for rule in layer.exclude:
            if state_meets_rule(param.state, rule, layer.name):
                included = False
        for rule in layer.include:
            if state_meets_rule(param.state, rule, layer.name):
                included = True
        if included:
            out.layer.add().CopyFrom(layer)
    return out
