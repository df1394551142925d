from django.urls import include, path
from library import views

urlpatterns = [
    path("", views.index, name="index"),
    path("books/", views.books, name="books"),
    path("books/<int:book_id>/", views.book, name="book"),
    path("async/books/<int:book_id>/", views.abook, name="abook"),
    path("stats/", views.stats, name="stats"),
    path("stream/", views.stream, name="stream"),
    path("leak/", views.leak, name="leak"),
    path("metrics", views.metrics, name="metrics"),
    # kotoba-memory's report view (every worker of the server): /_kotoba/report, for the bearer token
    # KOTOBA_MEMORY_REPORT_TOKEN (set from KOTOBA_EXAMPLE_REPORT_TOKEN) or a staff user.
    path("_kotoba/", include("kotoba_memory_integrations.django.urls")),
]
