"""Every error code the pipeline raises, mapped to a one-line fix (one table, as the messages are
one line too): the CLI prints ``error [code]: message`` and then ``fix: ...``."""

from __future__ import annotations

HINTS: dict[str, str] = {
    "file_not_found": "check the path (relative paths start from the current folder)",
    "empty_file": "the file is empty: copy it again from where it was recorded",
    "unreadable_file": "check the file's permissions, or copy it somewhere readable",
    "not_a_video": "give a video (mp4, mov, avi, mkv, webm) or a pose file with --pose",
    "file_too_large": "cut or re-encode the recording (ffmpeg -i IN -c:v libx264 -crf 28 OUT.mp4)",
    "unsupported_codec": "re-encode it to H.264: ffmpeg -i IN -c:v libx264 OUT.mp4",
    "corrupt_video": "the file is truncated or damaged: copy it again, or re-encode what plays",
    "video_too_short": "record at least 9.6 s (GMA recordings are usually 3-5 minutes)",
    "video_too_long": "cut the recording: ffmpeg -ss START -t SECONDS -i IN -c copy OUT.mp4",
    "resolution_too_large": "scale it down: ffmpeg -i IN -vf scale=1920:-2 OUT.mp4",
    "no_infant_detected": "film the whole infant from above, well lit, nothing covering the body",
    "insufficient_tracking": "keep the whole infant in view and unobstructed for the recording",
    "invalid_pose": "pose files are float [T, 17, 3] arrays, Human3.6M order, 25 fps (README)",
    "invalid_tensor": "instances are float32 [N, 240, 3, 17, 17] joint differences (README)",
    "invalid_infant_data": "give all four or none: --sex --gestational-age-weeks "
    "--birth-weight-g --corrected-age-weeks",
    "invalid_dataset": "fix every line named (mam dataset check DIR lists them); layout: README, "
    "Training data layout",
    "insufficient_data": "add infants (minimum sizes: README, Training data layout); only below "
    "the minimums, --accept-small-data goes on anyway",
    "invalid_card_info": "fix the --card-info JSON: keys site, intended_use, population, contacts,"
    " limitations",
    "model_version_taken": 'give the weights a new version (their JSON\'s "version"), or build '
    "the weights already stored",
    "invalid_model_name": "name and version: lowercase letters, digits, . _ - (alphanumeric at "
    "both ends, at most 63)",
    "invalid_study": "check the study: a 1-64 character name, at least 2 recordings, known "
    "assessors, order, washout",
    "unknown_study": "name a study an admin created on the review app's /study page",
    "study_session_not_due": "open the session from your study list (/study) once its washout "
    "has passed",
    "source_kind": "calibrate one source kind at a time: --kind video or --kind pose_file, with "
    "recordings of that kind in --data",
    "invalid_manifest": "the manifest is a CSV with a 'file' column (README, mam batch)",
    "output_not_writable": "choose an --out folder you can write to",
    "disk_full": "free some space under --out, or write the results elsewhere",
    "corrupt_ledger": "restore ledger.sqlite from a backup, or move it aside and run mam batch "
    "again (all is screened again)",
    "altered_result": "restore ledger.sqlite from a backup, or delete the job (sqlite3 "
    "ledger.sqlite \"DELETE FROM jobs WHERE key='KEY'\")",
    "unverified_result": "run mam batch INPUT --out DIR again on that folder: results without a "
    "digest are screened again",
    "ledger_error": "check the disk and that no other program holds ledger.sqlite, then run "
    "mam batch again (it resumes)",
    "model_load_error": "check --weights / MAM_WEIGHTS (NAME.json beside its NAME.pt); after "
    "changing weights run python -m export onnx",
    "dependency_missing": "install what the message names (e.g. pip install -e '.[train]')",
    "dicom_without_video": "give a DICOM video object (MPEG-2, H.264 or HEVC encapsulated)",
    "invalid_fhir_reference": "give Patient/ID or SYSTEM|VALUE (SYSTEM an absolute URI) for "
    "patient or order, and Encounter/ID",
    "invalid_fhir_config": "fix MAM_FHIR_CODES_FILE / MAM_FHIR_UNIT, or a FHIR option of the call",
    "invalid_fhir_url": "give --base-url https://HOST/PATH (the FHIR server's base), or set "
    "MAM_FHIR_BASE_URL",
    "insecure_fhir_url": "use the server's https:// URL (plain http:// only on loopback: "
    "127.0.0.1, ::1, localhost)",
    "invalid_fhir_auth": "give --token-file F, or --client-id --token-url with "
    "--client-secret-file F or --private-key PEM",
    "fhir_token_error": "check the client id, secret or key and the token URL with the FHIR "
    "server's administrator",
    "invalid_fhir_bundle": "push mam batch's results.fhir.ndjson: one transaction Bundle with "
    "its identifier per line",
    "fhir_outbox_error": "check the disk and that --outbox / MAM_FHIR_OUTBOX is writable; move "
    "a damaged file aside",
    "fhir_outbox_entry_not_found": "give a result id that mam fhir outbox status lists",
    "invalid_dicomweb_url": "give --base-url https://HOST/PATH (the DICOMweb root, before "
    "/studies), or set MAM_DICOMWEB_BASE_URL",
    "insecure_dicomweb_url": "use the PACS's https:// URL (plain http:// only on loopback)",
    "invalid_dicomweb_auth": "give --token-file F (a bearer token) or --basic-auth-file F "
    "(user:password), a readable non-empty file, not both",
    "dicomweb_unauthorized": "check the token or user:password file with the PACS administrator",
    "nothing_to_store": "give an SR .dcm file, or the --out folder of mam batch --dicom-sr",
    "stow_refused": "store only SRs written by mam (mam screen --format dicom-sr, mam batch "
    "--dicom-sr); the PACS log gives its reason",
    "stow_unavailable": "check the PACS is up and reachable, then run mam dicom store again "
    "(storing twice is harmless)",
    "invalid_setting": "fix or unset the MAM_* variable named (its type: mam/settings.py)",
    "invalid_api_key_hashes": "list SHA-256 digests, not keys: mam serve --hash-key KEY prints one",
    "invalid_input": "see the message",
    "mam_error": "see the message; run again with -v for the log",
}


def hint(code: str) -> str:
    return HINTS.get(code, HINTS["mam_error"])
