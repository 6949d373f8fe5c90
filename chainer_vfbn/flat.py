"""What the optimizers that update every parameter in one operation share
(:mod:`chainer_vfbn.sgd` for the networks, :mod:`chainer_vfbn.adam` for the
synthesizers): which parameters they update, checked, and a parameter's name for
their messages. Each keeps its own flat buffers and update."""


def updated_params(optimizer, instead):
    """The parameters of ``optimizer.target`` with an enabled update rule, in order.
    Refuses, in one line naming the parameter, one added after ``setup()``, one with
    hyperparameters of its own (``instead``: the Chainer optimizer that takes them)
    and one not yet initialized."""
    who = type(optimizer).__name__
    params = []
    for p in optimizer.target.params():
        rule = p.update_rule
        if rule is None:
            raise RuntimeError('%s: parameter %s was added to the link after setup(); '
                               'call setup() again' % (who, param_name(optimizer.target, p)))
        if not rule.enabled:
            continue
        if len(vars(rule.hyperparam)) > 1:     # more than its ``_parent``
            raise ValueError('%s: parameter %s has its own hyperparameters (%s); use %s'
                             % (who, param_name(optimizer.target, p), ', '.join(sorted(
                                 set(vars(rule.hyperparam)) - {'_parent'})), instead))
        if p.array is None:
            raise RuntimeError('%s: parameter %s must be initialized before the first '
                               'update' % (who, param_name(optimizer.target, p)))
        params.append(p)
    return params


def param_name(link, param):
    """``param``'s path in ``link`` (``/units/0/conv1/W``)."""
    return next(name for name, p in link.namedparams() if p is param)
