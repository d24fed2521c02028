"""Lotse city simulator: a seeded city year driven through a running platform, its ground
truth, and the checker comparing the two (see README, "Demo").

Modules, usable from tests and other tools:

* :mod:`lotse_simulator.plan` — ``make_plan(city, seed=, year=, families=|scale=)`` → ``CityPlan``
  (deterministic; ``plan_digest`` fingerprints it);
* :mod:`lotse_simulator.platform` — ``SimulatedPlatform`` starts broker, topics and the four
  services as processes on the simulated clock (:mod:`lotse_simulator.clock`);
* :mod:`lotse_simulator.driver` — ``Driver(plan, city, endpoints, tokens, clock_file=).run()``
  → ``Truth``;
* :mod:`lotse_simulator.truth` — ``Truth`` records, ``expected_kpis``, ``save`` / ``load``;
* :mod:`lotse_simulator.checker` — ``await check(truth, endpoints, tokens, zone=)`` →
  ``CheckReport`` (``ok``, ``mismatches``, ``summary()``);
* :mod:`lotse_simulator.endpoints` — ``Endpoints`` (base URLs, bootstrap, topic prefix) and
  ``Tokens`` (bearer tokens per role from the issuer key the platform trusts).
"""
