import django.db.models.deletion
from django.db import migrations, models


def seed(apps, schema_editor):
    Author = apps.get_model("library", "Author")
    Book = apps.get_model("library", "Book")
    authors = Author.objects.bulk_create([Author(id=i, name=f"Author {i}") for i in range(1, 11)])
    Book.objects.bulk_create(
        [Book(id=i, title=f"Book {i}", year=1950 + i % 70, author=authors[i % 10]) for i in range(1, 201)]
    )


class Migration(migrations.Migration):
    initial = True
    dependencies: list[tuple[str, str]] = []

    operations = [
        migrations.CreateModel(
            name="Author",
            fields=[
                (
                    "id",
                    models.AutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID"),
                ),
                ("name", models.CharField(max_length=80)),
            ],
        ),
        migrations.CreateModel(
            name="Book",
            fields=[
                (
                    "id",
                    models.AutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID"),
                ),
                ("title", models.CharField(max_length=200)),
                ("year", models.IntegerField()),
                (
                    "author",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.CASCADE, related_name="books", to="library.author"
                    ),
                ),
            ],
        ),
        migrations.RunPython(seed, migrations.RunPython.noop),
    ]
