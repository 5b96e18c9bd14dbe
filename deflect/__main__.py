from deflect.launch import main

main()
