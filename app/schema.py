"""Every table of the gateway, imported so that `Base.metadata` knows them all."""

from app.accounting.daily import UsageDaily
from app.accounting.models import LedgerEntry
from app.db import Base
from app.files.models import StoredFile
from app.groups.models import TokenGroup
from app.outputs.models import OutputFile
from app.predictions.models import Prediction
from app.tokens.models import ApiToken, InstanceKey
from app.webhooks.models import WebhookDelivery

__all__ = ["ApiToken", "Base", "InstanceKey", "LedgerEntry", "OutputFile", "Prediction", "StoredFile",
           "TokenGroup", "UsageDaily", "WebhookDelivery"]
