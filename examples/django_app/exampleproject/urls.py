from django.urls import path
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
    path("_kotoba/report", views.report, name="kotoba-report"),
]
