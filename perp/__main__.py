from perp.cli import main

main()
