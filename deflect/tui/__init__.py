"""The Textual dashboard (`deflect dashboard`): a read-only live view of the database."""
