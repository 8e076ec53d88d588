from wsfold.cli import main

main()
