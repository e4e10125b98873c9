from ckptctl.cli import main

main()
