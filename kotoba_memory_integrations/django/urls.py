"""The report view's URLs: ``path("_kotoba/", include("kotoba_memory_integrations.django.urls"))``."""

from django.urls import path

from kotoba_memory_integrations.django import views

app_name = "kotoba_memory"
urlpatterns = [path("report", views.report, name="report")]
