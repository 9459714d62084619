"""The read-only dashboards: the overview (money) and activity (traffic, keys, holds now)."""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import Response

from nodeprov.core import admin_queries as queries
from nodeprov.core import admin_stats as stats
from nodeprov.http.admin.app import AdminBase, Form
from nodeprov.http.admin.charts import usage_svg
from nodeprov.http.admin.security import Session

CHART_DAYS = 30


class Dashboards(AdminBase):
    """The overview and activity pages."""

    async def overview(self, request: Request, session: Session, form: Form) -> Response:
        ledger = self.core.ledger
        usage = await queries.usage_by_model(ledger)
        models = sorted({u.model for u in usage})
        model = request.query_params.get("model", "")
        model = model if model in models else ""
        days = await stats.daily_usage(ledger, CHART_DAYS, model=model or None)
        return self.render(
            request,
            "overview.html",
            session,
            nav="overview",
            earnings=await queries.earnings(ledger),
            totals=await queries.totals(ledger),
            pools=await queries.proof_pools(ledger),
            usage=usage,
            models=models,
            model=model,
            days=days,
            revenue_chart=usage_svg(days, "msat"),
            requests_chart=usage_svg(days, "requests"),
            streams=self.metrics.streams_open if self.metrics else None,
            audit=await ledger.audit(),
        )

    async def activity(self, request: Request, session: Session, form: Form) -> Response:
        ledger = self.core.ledger
        keys, per_request = await stats.key_usage(ledger, CHART_DAYS)
        return self.render(
            request,
            "activity.html",
            session,
            nav="activity",
            rates=stats.request_rates(self.metrics) if self.metrics else [],
            latencies=stats.latencies(self.metrics) if self.metrics else [],
            counting=self.metrics is not None,
            streams=self.metrics.streams_open if self.metrics else None,
            holds=await stats.open_holds(ledger),
            keys=keys,
            per_request=per_request,
            days=CHART_DAYS,
            now=int(time.time()),
        )
