from ckptctl.cli import entry

entry()
