"""Training methods, looked up by name. Each value is the module that implements the method's
`LOADERS` and `train_step`; modules are imported on first use so that `semiseg config show` stays fast."""

METHODS: dict[str, str] = {
    "supervised": "semiseg_cli.methods.supervised",
    "fixmatch": "semiseg_cli.methods.fixmatch",
    "unimatch": "semiseg_cli.methods.unimatch",
    "prevmatch": "semiseg_cli.methods.prevmatch",
    "s4mc": "semiseg_cli.methods.s4mc",
    "semivl": "semiseg_cli.methods.semivl",
}
