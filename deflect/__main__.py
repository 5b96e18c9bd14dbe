from deflect.cli import main

main()
