"""Validate: Great Expectations on the new data version, forgetting and utility gates on the model.

Suites and results only ever see keyed hashes of subject ids, and results use the
SUMMARY format, because Great Expectations stores `value_set`s verbatim.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.settings import GateSettings

log = logging.getLogger("lethe.validate")

HASH_COLUMN = "subject_hash"
# Name of the data validation result on the candidate's MLflow run. The registry also renders it as Data Docs.
DATA_VALIDATION_ARTIFACT = "data_validation.json"
DATA_DOCS_SITE = "lethe"


@dataclass(frozen=True)
class GateResult:
    name: str
    value: float
    threshold: float
    passed: bool
    two_sided: bool = False

    def describe(self) -> str:
        verdict = "pass" if self.passed else "FAIL"
        bound = f"|value| max {self.threshold:g}" if self.two_sided else f"max {self.threshold:g}"
        return f"{self.name} = {self.value:.3f} ({bound}): {verdict}"


def validate_data(frame: pd.DataFrame, subject_hashes: pd.Series, forgotten: list[str],
                  expected_dtypes: dict[str, str], expected_rows: int) -> dict:
    """Run the data suite on the new data version; return the SUMMARY result as a dict."""
    import great_expectations as gx

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = {"globally": False}
    batch = context.data_sources.add_pandas("lethe").add_dataframe_asset("training_data").add_batch_definition_whole_dataframe("all")

    suite = gx.ExpectationSuite(name="erasure")
    suite.add_expectation(gx.expectations.ExpectColumnValuesToNotBeInSet(column=HASH_COLUMN, value_set=sorted(forgotten)))
    suite.add_expectation(gx.expectations.ExpectTableColumnsToMatchOrderedList(column_list=[*expected_dtypes, HASH_COLUMN]))
    for column, dtype in expected_dtypes.items():
        suite.add_expectation(gx.expectations.ExpectColumnValuesToBeOfType(column=column, type_=dtype))
    suite.add_expectation(gx.expectations.ExpectTableRowCountToEqual(value=expected_rows))
    suite = context.suites.add(suite)

    definition = context.validation_definitions.add(gx.ValidationDefinition(name="erasure", data=batch, suite=suite))
    checked = frame.assign(**{HASH_COLUMN: subject_hashes.to_numpy()})
    result = definition.run(batch_parameters={"dataframe": checked}, result_format="SUMMARY")
    payload = result.to_json_dict()
    failed = [r["expectation_config"]["type"] for r in payload["results"] if not r["success"]]
    log.info("Data validation: %d expectations, %d failed %s", len(payload["results"]), len(failed), failed or "")
    return payload


def build_data_docs(report: dict, directory: Path, run_name: str) -> Path:
    """Render a stored validation result as a Great Expectations Data Docs site and return its index page.

    The pages show only what the result contains: hashed subject keys and never a raw id,
    because the suite receives hashed keys and the result uses the SUMMARY format. The
    site's fonts and images (about 4 MB with GX 1.24.1) are removed, because its pages load
    their styles and scripts from CDNs and reference only the favicon locally.
    """
    import great_expectations as gx
    from great_expectations.core.expectation_validation_result import ExpectationSuiteValidationResultSchema
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.resource_identifiers import (
        ExpectationSuiteIdentifier,
        ValidationResultIdentifier,
    )

    result = ExpectationSuiteValidationResultSchema().load(report)
    context = gx.get_context(mode="ephemeral")
    context.add_data_docs_site(DATA_DOCS_SITE, {
        "class_name": "SiteBuilder",
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(directory)},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
    })
    run_time = (report.get("meta", {}).get("run_id") or {}).get("run_time")
    key = ValidationResultIdentifier(
        expectation_suite_identifier=ExpectationSuiteIdentifier(name=result.suite_name),
        run_id=RunIdentifier(run_name=run_name, run_time=run_time),
        batch_identifier="training_data",
    )
    context.validation_results_store.set(key, result)
    context.build_data_docs(site_names=[DATA_DOCS_SITE])
    _drop_unreferenced_assets(directory / "static")
    return directory / "index.html"


def _drop_unreferenced_assets(static: Path) -> None:
    shutil.rmtree(static / "fonts", ignore_errors=True)
    for image in (static / "images").glob("*"):
        if image.name != "favicon.ico":
            image.unlink()


def utility_gates(champion: dict[str, float], candidate: dict[str, float], gates: GateSettings) -> list[GateResult]:
    """Accuracy drops against the champion, in percentage points, on the same retain and test sets."""
    retain_drop = 100 * (champion["retain_accuracy"] - candidate["retain_accuracy"])
    test_drop = 100 * (champion["test_accuracy"] - candidate["test_accuracy"])
    return [
        GateResult("retain_accuracy_drop_pp", retain_drop, gates.max_retain_drop_pp, retain_drop <= gates.max_retain_drop_pp),
        GateResult("test_accuracy_drop_pp", test_drop, gates.max_test_drop_pp, test_drop <= gates.max_test_drop_pp),
    ]


def forgetting_gates(evidence, gates: GateSettings) -> list[GateResult]:
    """The forget set must look like held-out data of the same size to the model.

    Two-sided: a forget set that the model gets markedly wrong (negative z) is as
    distinguishable as one it remembers, so over-forgetting fails the gate too.
    """
    return [
        GateResult("forget_accuracy_z", evidence.accuracy_z, gates.max_accuracy_z,
                   abs(evidence.accuracy_z) <= gates.max_accuracy_z, two_sided=True),
        GateResult("forget_mia_z", evidence.mia_z, gates.max_mia_z,
                   abs(evidence.mia_z) <= gates.max_mia_z, two_sided=True),
    ]


def gates_as_dict(results: list[GateResult]) -> list[dict]:
    return [asdict(r) for r in results]


def validate_new_data(ws, hasher, purged, forgotten: list[str]) -> dict:
    """Validate the new data version against the pre-purge schema and row count."""
    from tasks.dataset import SUBJECT_KEY
    from tasks.purge import subject_hashes_of
    from tasks.shards import read_all

    frame = read_all(ws.data_dir)
    expected = {column: str(dtype) for column, dtype in purged.forget_rows.dtypes.items()}
    return validate_data(frame, subject_hashes_of(frame[SUBJECT_KEY], hasher), forgotten, expected, purged.rows_after)


@task(name="validate-data", cache_policy=NO_CACHE, persist_result=False)
def validate_data_task(ws, hasher, purged, forgotten: list[str]) -> dict:
    """Run the Great Expectations suite on the new data version."""
    return validate_new_data(ws, hasher, purged, forgotten)
