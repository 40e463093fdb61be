//! The feature store's batch path across its real process boundaries:
//! `adservectl features backfill` (a Parquet file into DynamoDB Local), the
//! running feature-service (GetFeatures) and the trainer's point-in-time
//! retrieval (`python -m adserve_trainer.offline`) over the same file.
//!
//! - The same raw values give bit-identical rows through the serving path
//!   and the training path (range checks and transforms included).
//! - A backfill killed mid-run resumes where its checkpoint says, and ends
//!   with every entity's latest row in the table.

use std::{
    collections::{BTreeSet, HashMap},
    fs::File,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use adserve_feature_service::backfill::EVENT_TIMESTAMP;
use adserve_features::{Entity, Source};
use adserve_integration_tests::{Stack, adstack_home, binary, repo_root};
use adserve_proto::v1::{GetFeaturesRequest, RequestContext, feature_service_client::FeatureServiceClient};
use arrow::{
    array::{
        ArrayRef, AsArray, BooleanArray, Float64Array, Int64Array, RecordBatch, StringArray, TimestampMillisecondArray,
    },
    datatypes::{DataType, Field, Float32Type, Schema, TimeUnit},
};
use parquet::{
    arrow::{ArrowWriter, arrow_reader::ParquetRecordBatchReaderBuilder},
    file::properties::WriterProperties,
};
use tokio::process::Command;

/// The batch attributes of `entity`, sorted (one column each in a batch file).
fn attributes(entity: Entity) -> Vec<String> {
    let set: BTreeSet<String> =
        adserve_features::registry().select(entity, Source::Dynamodb).map(|(_, f)| f.attribute.clone()).collect();
    set.into_iter().collect()
}

/// One history row of a batch file: key, event time, attribute values and
/// categoricals' raw strings (absent: null).
#[derive(Default)]
struct Row {
    key: String,
    ms: i64,
    values: HashMap<String, Option<f64>>,
    text: HashMap<String, String>,
}

/// The registry's batch attributes of `entity` stored as strings (categoricals).
fn text_attributes(entity: Entity) -> Vec<String> {
    let r = adserve_features::registry();
    let set: BTreeSet<String> = r
        .categorical
        .iter()
        .filter(|f| f.entity == entity && f.source == Source::Dynamodb)
        .map(|f| f.attribute.clone())
        .collect();
    set.into_iter().collect()
}

/// Writes a batch file for `entity` (ad keys as int64) with `per_group` rows per row group.
fn write_batch_file(path: &Path, entity: Entity, rows: &[Row], per_group: usize) -> anyhow::Result<()> {
    let attrs = attributes(entity);
    let (key, key_type) = match entity {
        Entity::Ad => ("ad_id", DataType::Int64),
        _ => ("user_id", DataType::Utf8),
    };
    let mut fields = vec![
        Field::new(key, key_type.clone(), false),
        Field::new(EVENT_TIMESTAMP, DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())), false),
    ];
    fields.extend(attrs.iter().map(|a| Field::new(a, DataType::Float64, true)));
    let texts = text_attributes(entity);
    fields.extend(texts.iter().map(|a| Field::new(a, DataType::Utf8, true)));
    let schema = Arc::new(Schema::new(fields));
    let key_col: ArrayRef = if key_type == DataType::Int64 {
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.key.parse::<i64>().expect("ad id"))))
    } else {
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.key.as_str())))
    };
    let mut columns = vec![
        key_col,
        Arc::new(TimestampMillisecondArray::from_iter_values(rows.iter().map(|r| r.ms)).with_timezone("UTC"))
            as ArrayRef,
    ];
    for a in &attrs {
        columns.push(Arc::new(Float64Array::from_iter(rows.iter().map(|r| r.values.get(a).copied().flatten()))));
    }
    for a in &texts {
        columns.push(Arc::new(StringArray::from_iter(rows.iter().map(|r| r.text.get(a)))));
    }
    let props = WriterProperties::builder().set_max_row_group_row_count(Some(per_group)).build();
    let mut w = ArrowWriter::try_new(File::create(path)?, schema.clone(), Some(props))?;
    w.write(&RecordBatch::try_new(schema, columns)?)?;
    w.close()?;
    Ok(())
}

fn backfill(s: &Stack, entity: &str, file: &Path) -> Command {
    let mut c = Command::new(binary("adservectl"));
    c.args(["features", "backfill", "--entity", entity, "--file"])
        .arg(file)
        .env("ADSERVE_DYNAMODB__ENDPOINT", &s.dynamodb)
        .kill_on_drop(true);
    c
}

async fn run_ok(mut c: Command) -> anyhow::Result<String> {
    let out = c.output().await?;
    anyhow::ensure!(
        out.status.success(),
        "{:?} exited {}: {}{}",
        c.as_std().get_program(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn python() -> PathBuf {
    adstack_home().join("venv/bin/python")
}

/// The trainer's point-in-time retrieval (its CLI, in its own process) of
/// `user` with each of `ads`, as of `now` in context `ctx`, over the user and
/// ad batch files, under `registry_file` (None: the repository's registry).
async fn offline_rows(
    dir: &Path,
    (user, ads, now, ctx): (&str, &[i64], i64, &RequestContext),
    (user_file, ad_file): (&Path, &Path),
    registry_file: Option<&Path>,
) -> anyhow::Result<RecordBatch> {
    let entities = dir.join("entities.parquet");
    let n = ads.len();
    let schema = Arc::new(Schema::new(vec![
        Field::new("user_id", DataType::Utf8, false),
        Field::new("ad_id", DataType::Int64, false),
        Field::new(EVENT_TIMESTAMP, DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())), false),
        Field::new("device", DataType::Utf8, false),
        Field::new("placement", DataType::Utf8, false),
        Field::new("surface", DataType::Utf8, false),
        Field::new("coppa", DataType::Boolean, false),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from(vec![user; n])),
            Arc::new(Int64Array::from(ads.to_vec())),
            Arc::new(TimestampMillisecondArray::from(vec![now; n]).with_timezone("UTC")),
            Arc::new(StringArray::from(vec![ctx.device.as_str(); n])),
            Arc::new(StringArray::from(vec![ctx.placement.as_str(); n])),
            Arc::new(StringArray::from(vec![ctx.surface.as_str(); n])),
            Arc::new(BooleanArray::from(vec![ctx.coppa; n])),
        ],
    )?;
    let mut w = ArrowWriter::try_new(File::create(&entities)?, schema, None)?;
    w.write(&batch)?;
    w.close()?;
    let out = dir.join("offline.parquet");
    let mut py = Command::new(python());
    py.current_dir(repo_root().join("training")).args(["-m", "adserve_trainer.offline"]);
    if let Some(file) = registry_file {
        py.arg("--registry").arg(file);
    }
    py.arg("--entities")
        .arg(&entities)
        .arg("--user-features")
        .arg(user_file)
        .arg("--ad-features")
        .arg(ad_file)
        .arg("--out")
        .arg(&out);
    run_ok(py).await?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(File::open(&out)?)?.build()?;
    let offline: Vec<RecordBatch> = reader.collect::<Result<_, _>>()?;
    Ok(arrow::compute::concat_batches(&offline[0].schema(), &offline)?)
}

#[tokio::test]
async fn the_serving_path_and_the_training_path_give_identical_rows() -> anyhow::Result<()> {
    let s = Stack::ready().await?;
    let registry = adserve_features::registry();
    let dir = tempfile::tempdir()?;
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let user = format!("identity-{tag}");
    let now = adserve_feature_service::backfill::now_ms();
    let hour = 3_600_000;
    let v = |pairs: &[(&str, Option<f64>)]| pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect::<HashMap<_, _>>();
    let t =
        |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<HashMap<_, _>>();

    // The user's history: the older row must not be what either path serves.
    // Values that are not exact in f32 (0.1, 1/3), one outside its range
    // (interest_food), one null (interest_books), and a count log1p'd.
    let users = [
        Row {
            key: user.clone(),
            ms: now - 48 * hour,
            values: v(&[("ctr_30d", Some(0.9)), ("sessions_7d", Some(1.0))]),
            text: t(&[("top_interest", "books")]),
        },
        Row {
            key: user.clone(),
            ms: now - hour,
            values: v(&[
                ("ctr_30d", Some(0.1)),
                ("sessions_7d", Some(12_345.0)),
                ("interest_travel", Some(1.0 / 3.0)),
                ("interest_games", Some(0.0)),
                ("interest_finance", Some(0.999_999_9)),
                ("interest_food", Some(1.5)),
                ("interest_books", None),
            ]),
            text: t(&[("top_interest", "games")]),
        },
    ];
    let base = 9_300_000_000 + (uuid::Uuid::new_v4().as_u128() as i64 & 0x3fff_ffff);
    let ads: Vec<i64> = (0..5).map(|i| base + i).collect();
    let mut ad_rows = Vec::new();
    for (i, ad) in ads.iter().enumerate() {
        let q = [0.1, 0.25, 0.6, 0.75, 2.0][i]; // buckets 0, 1, 2, 3 and one out of range
        ad_rows.push(Row {
            key: ad.to_string(),
            ms: now - 2 * hour,
            values: v(&[("ctr_7d", Some(0.5)), ("quality_score", Some(0.9))]),
            text: t(&[("topic", "finance")]),
        });
        if i < 4 {
            ad_rows.push(Row {
                key: ad.to_string(),
                ms: now - hour,
                values: v(&[
                    ("ctr_7d", Some(0.01 * (i as f64 + 1.0) / 3.0)),
                    ("quality_score", Some(q)),
                    ("topic_travel", Some((i % 2) as f64)),
                    ("topic_food", Some(1.0)),
                ]),
                // The fourth ad's topic is unknown (null): missing, bucket 0.
                text: if i < 3 { t(&[("topic", ["travel", "games", "travel"][i])]) } else { HashMap::new() },
            });
        }
    }
    let (user_file, ad_file) = (dir.path().join("users.parquet"), dir.path().join("ads.parquet"));
    write_batch_file(&user_file, Entity::User, &users, 1)?;
    write_batch_file(&ad_file, Entity::Ad, &ad_rows, 3)?;
    run_ok(backfill(&s, "user", &user_file)).await?;
    run_ok(backfill(&s, "ad", &ad_file)).await?;

    // Serving: GetFeatures from the running feature-service.
    let ctx = RequestContext { placement: "sidebar".into(), device: "tablet".into(), ..Default::default() };
    let mut c = FeatureServiceClient::connect(s.features.clone()).await?;
    let resp = c
        .get_features(GetFeaturesRequest { user_id: user.clone(), ad_ids: ads.clone(), context: Some(ctx.clone()) })
        .await?
        .into_inner();
    anyhow::ensure!(resp.degraded.is_empty(), "degraded: {:?}", resp.degraded);
    let served = resp.matrix.expect("matrix");
    assert_eq!(served.feature_names, registry.names());

    // Training: point-in-time retrieval over the same files, as of now.
    let n = ads.len();
    let offline = offline_rows(dir.path(), (&user, &ads, now, &ctx), (&user_file, &ad_file), None).await?;

    let cols = registry.features.len();
    assert_eq!(same_dense(registry, &served, &offline, &ads), n * cols);
    // The typed columns too: the request's and the batch tier's categoricals, and their crosses.
    assert_eq!(same_typed(registry, &served, &offline, &ads), n * registry.categorical.len());
    // The rows are not all defaults: the file's latest values and transforms
    // reached both paths.
    let cell = |row: usize, name: &str| served.values[row * cols + registry.index_of(name).expect(name)];
    assert_eq!(cell(0, "user_ctr_30d"), 0.1f64 as f32);
    assert_eq!(cell(0, "user_sessions_7d_log"), 12_346f64.ln() as f32);
    assert_eq!(
        cell(0, "user_interest_food"),
        registry.features[registry.index_of("user_interest_food").unwrap()].default
    );
    assert_eq!((0..4).map(|r| cell(r, "ad_quality_bucket")).collect::<Vec<_>>(), [0.0, 1.0, 2.0, 3.0]);
    assert_eq!(cell(4, "ad_quality_score"), 0.9, "the ad with one old row serves it");
    assert_eq!(cell(0, "ctx_placement_sidebar"), 1.0);
    let col = |name: &str| registry.index_of(name).expect(name);
    assert_eq!(resp.invalid[col("user_interest_food")], n as u32);
    assert_eq!(resp.missing[col("user_interest_books")], n as u32);
    // The batch tier's categoricals as of now (the user's top interest moved
    // from books to games; the fifth ad has only its older row, finance),
    // and their cross.
    let cats = registry.categorical.len();
    let [topic, interest, cross] = ["ad_topic_id", "user_top_interest_id", "user_interest_x_ad_topic"]
        .map(|name| &registry.categorical[registry.categorical.iter().position(|f| f.name == name).expect(name)]);
    let typed = |row: usize, f: &adserve_features::FeatureSpec| {
        served.categorical_ids[row * cats + registry.categorical.iter().position(|g| g.name == f.name).unwrap()]
    };
    for (row, want) in [Some("travel"), Some("games"), Some("travel"), None, Some("finance")].into_iter().enumerate() {
        assert_eq!(typed(row, topic), topic.category_id(want), "ad {row}'s topic");
        assert_eq!(typed(row, interest), interest.category_id(Some("games")));
        assert_eq!(typed(row, cross), cross.cross_id(Some("games"), want), "ad {row}'s cross");
    }
    assert_eq!(resp.missing[cols + registry.categorical.iter().position(|f| f.name == "ad_topic_id").unwrap()], 1);

    // A COPPA request for the same user: both paths blank every user
    // feature (the service reads none; offline, the row's `coppa` says so),
    // and count none of them missing.
    let coppa = RequestContext { coppa: true, ..ctx };
    let resp = c
        .get_features(GetFeaturesRequest { user_id: String::new(), ad_ids: ads.clone(), context: Some(coppa.clone()) })
        .await?
        .into_inner();
    let served = resp.matrix.expect("matrix");
    let offline = offline_rows(dir.path(), (&user, &ads, now, &coppa), (&user_file, &ad_file), None).await?;
    assert_eq!(same_dense(registry, &served, &offline, &ads), n * cols);
    assert_eq!(same_typed(registry, &served, &offline, &ads), n * registry.categorical.len());
    for (c, f) in registry.features.iter().enumerate().filter(|(_, f)| f.entity == Entity::User) {
        assert_eq!(served.values[c], f.default, "{}", f.name);
        assert_eq!(resp.missing[c], 0, "{}", f.name);
    }
    let bucket = registry.index_of("ad_quality_bucket").expect("registered");
    assert_eq!(served.values[cols + bucket], 1.0, "ad features are still served");
    Ok(())
}

/// Asserts that the served matrix's dense block equals the offline output's
/// columns bit for bit, row by row; returns the cells compared.
fn same_dense(
    registry: &adserve_features::FeatureRegistry,
    served: &adserve_proto::v1::FeatureMatrix,
    offline: &RecordBatch,
    ads: &[i64],
) -> usize {
    let cols = registry.features.len();
    let mut compared = 0;
    for (c, name) in registry.names().iter().enumerate() {
        let col = offline.column_by_name(name).unwrap_or_else(|| panic!("offline output lacks {name}"));
        let col = col.as_primitive::<Float32Type>();
        for (row, ad) in ads.iter().enumerate() {
            let (s_v, o_v) = (served.values[row * cols + c], col.value(row));
            assert_eq!(s_v.to_bits(), o_v.to_bits(), "{name}, ad {ad}: served {s_v} vs offline {o_v}");
            compared += 1;
        }
    }
    compared
}

#[tokio::test]
async fn a_killed_backfill_resumes_from_its_checkpoint_and_writes_each_latest_row() -> anyhow::Result<()> {
    let s = Stack::ready().await?;
    let dir = tempfile::tempdir()?;
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let (users, groups, per_group) = (6000usize, 12usize, 1000usize);
    // Every user has two rows, one in each half of the file; which half holds
    // the newer one alternates, so every row group holds winners.
    let mut rows = Vec::with_capacity(users * 2);
    for half in 0..2 {
        for u in 0..users {
            let newer = (u % 2 == 0) == (half == 0);
            let ctr = if newer { 0.0001 * (u % 5000) as f64 } else { 0.9 };
            rows.push(Row {
                key: format!("bf-{tag}-{u}"),
                ms: if newer { 2_000 } else { 1_000 },
                values: [("ctr_30d".to_string(), Some(ctr)), ("sessions_7d".to_string(), Some(u as f64))].into(),
                ..Default::default()
            });
        }
    }
    let file = dir.path().join("users.parquet");
    write_batch_file(&file, Entity::User, &rows, per_group)?;
    let checkpoint = dir.path().join("users.parquet.checkpoint.json");
    let done = |cp: &Path| -> (usize, bool) {
        std::fs::read(cp)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .map_or((0, false), |v| (v["done"].as_array().map_or(0, Vec::len), v["complete"] == true))
    };

    // Throttled so it cannot finish before it is killed.
    let mut first = backfill(&s, "user", &file);
    first.args(["--max-items-per-second", "1500"]);
    let mut child = first.spawn()?;
    let start = tokio::time::Instant::now();
    while done(&checkpoint).0 < 2 {
        anyhow::ensure!(start.elapsed() < Duration::from_secs(60), "no progress in the checkpoint");
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("the backfill ended ({status}) before it could be killed");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    child.kill().await?; // SIGKILL
    let (after_kill, complete) = done(&checkpoint);
    assert!(!complete && (2..groups).contains(&after_kill), "killed mid-run: {after_kill} groups done");

    let out = run_ok(backfill(&s, "user", &file)).await?;
    let skipped: usize = out
        .split(" of ")
        .next()
        .and_then(|s| s.rsplit('(').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no resume count in {out:?}"));
    assert!(skipped >= after_kill, "resumed past the checkpoint: {out}");
    assert!(out.contains(&format!("of {groups} row groups")), "{out}");
    assert_eq!(done(&checkpoint), (groups, true));

    // Every user holds its newer row (a sample across every row group).
    let store = s.batch_store();
    for u in (0..users).step_by(97) {
        let got = store.user(&format!("bf-{tag}-{u}")).await?.values;
        assert_eq!(got.get("ctr_30d").copied(), Some((0.0001 * (u % 5000) as f64) as f32), "user {u}");
        assert_eq!(got.get("sessions_7d").copied(), Some(u as f32), "user {u}");
    }
    // Run again: the checkpoint says complete, nothing is written.
    let again = run_ok(backfill(&s, "user", &file)).await?;
    assert!(again.contains("already complete"), "{again}");
    Ok(())
}

#[tokio::test]
async fn a_backfill_file_that_does_not_fit_the_registry_is_refused_naming_the_column() -> anyhow::Result<()> {
    let s = Stack::ready().await?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("ads.parquet");
    // An ad file given as users: its key and attributes are not the user's.
    let rows = [Row { key: "7".into(), ms: 1, ..Default::default() }];
    write_batch_file(&file, Entity::Ad, &rows, 10)?;
    let out = backfill(&s, "user", &file).output().await?;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("column ad_id: not a batch attribute of user features"), "{err}");
    let missing = dir.path().join("nope.parquet");
    let out = backfill(&s, "ad", &missing).output().await?;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope.parquet"));
    Ok(())
}

/// Credentials from the AWS SDK's default chain (what EKS IRSA, ECS task
/// roles and instance profiles use), across the process boundary: a
/// feature-service with `dynamodb.credentials = "default_chain"` and no keys
/// of its own reads the batch tier with the credentials the chain finds in
/// its environment; the same service with nothing for the chain to find
/// serves defaults and names DynamoDB, rather than failing or hanging.
#[tokio::test]
async fn the_batch_tier_reads_with_the_default_credential_chain() -> anyhow::Result<()> {
    let s = Stack::ready().await?;
    let user = format!("chain-user-{}", uuid::Uuid::new_v4().simple());
    let batch = s.batch_store();
    batch.ensure_tables().await?;
    batch.put_users(&[(user.clone(), [("ctr_30d".to_string(), 0.0625)].into())]).await?;
    let registry = adserve_features::registry();
    let col = registry.index_of("user_ctr_30d").expect("user_ctr_30d");
    let empty_home = tempfile::tempdir()?;

    let serve = |with_env_keys: bool| {
        let port = adserve_integration_tests::free_port();
        let mut command = Command::new(binary("adserve-feature-service"));
        command
            .env("ADSERVE_MODE", "serve")
            .env("ADSERVE_SERVER__GRPC_ADDR", format!("127.0.0.1:{port}"))
            .env("ADSERVE_SERVER__METRICS_ADDR", format!("127.0.0.1:{}", adserve_integration_tests::free_port()))
            .env("ADSERVE_REDIS__URL", &s.redis)
            .env("ADSERVE_DYNAMODB__ENDPOINT", &s.dynamodb)
            .env("ADSERVE_DYNAMODB__CREDENTIALS", "default_chain")
            .env("ADSERVE_DYNAMODB__ACCESS_KEY_ID", "")
            .env("ADSERVE_DYNAMODB__SECRET_ACCESS_KEY", "")
            // Nothing else for the chain to find: no profile, no instance metadata.
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env_remove("AWS_PROFILE")
            .env("HOME", empty_home.path())
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("ADSERVE_TELEMETRY__LOG_FILTER", "error")
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true);
        if with_env_keys {
            // DynamoDB Local accepts any key made of letters and digits.
            command.env("AWS_ACCESS_KEY_ID", "adservechain").env("AWS_SECRET_ACCESS_KEY", "adservechain");
        }
        (command, port)
    };
    let request = GetFeaturesRequest {
        user_id: user.clone(),
        ad_ids: vec![1],
        context: Some(RequestContext { placement: "feed_top".into(), device: "mobile".into(), ..Default::default() }),
    };
    for with_env_keys in [true, false] {
        let (mut command, port) = serve(with_env_keys);
        let _child = command.spawn()?;
        let mut client = None;
        for _ in 0..100 {
            if let Ok(c) = FeatureServiceClient::connect(format!("http://127.0.0.1:{port}")).await {
                client = Some(c);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut client = client.expect("the feature-service started");
        // The first call resolves the chain; ask until the answer settles.
        let mut last = None;
        for _ in 0..50 {
            let r = client.get_features(request.clone()).await?.into_inner();
            let value = r.matrix.as_ref().expect("matrix").values[col];
            let dynamodb_degraded = r.degraded.iter().any(|d| d.component == "dynamodb");
            last = Some((value, dynamodb_degraded, r.degraded));
            if with_env_keys && value == 0.0625 && !dynamodb_degraded {
                break;
            }
            if !with_env_keys && dynamodb_degraded {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (value, dynamodb_degraded, degraded) = last.expect("asked");
        if with_env_keys {
            assert_eq!(value, 0.0625, "the chain's credentials read the batch row: {degraded:?}");
            assert!(!dynamodb_degraded, "{degraded:?}");
        } else {
            assert!(dynamodb_degraded, "no credentials anywhere, yet DynamoDB answered: {degraded:?}");
            assert_ne!(value, 0.0625);
        }
    }
    Ok(())
}

#[tokio::test]
async fn batch_features_past_their_freshness_sla_are_served_and_reported_stale() -> anyhow::Result<()> {
    // Items written (as the backfill writes them) with the time their values
    // became true: a user and an ad 40 hours old (the batch features' SLA
    // is 36 h), beside a fresh ad. The running feature-service serves them
    // and says which are stale.
    let s = Stack::ready().await?;
    let store = s.batch_store();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as i64;
    let hour = 3_600_000;
    let run = uuid::Uuid::new_v4().as_u128() as i64 & 0x3fff_ffff;
    let user = format!("stale-user-{run}");
    let (stale_ad, fresh_ad) = (9_400_000_000 + 2 * run, 9_400_000_001 + 2 * run);
    let row = |id: String, attr: &str, v: f32, as_of: i64| adserve_feature_service::BatchRow {
        id,
        values: HashMap::from([(attr.to_string(), v)]),
        as_of_ms: Some(as_of),
        ..Default::default()
    };
    store.put_rows(Entity::User, &[row(user.clone(), "ctr_30d", 0.04, now - 40 * hour)]).await?;
    store
        .put_rows(
            Entity::Ad,
            &[
                row(stale_ad.to_string(), "ctr_7d", 0.03, now - 40 * hour),
                row(fresh_ad.to_string(), "ctr_7d", 0.02, now - hour),
            ],
        )
        .await?;
    let mut c = FeatureServiceClient::connect(s.features.clone()).await?;
    let ctx = RequestContext { placement: "sidebar".into(), device: "tablet".into(), ..Default::default() };
    let ask =
        |user: String, ads: Vec<i64>| GetFeaturesRequest { user_id: user, ad_ids: ads, context: Some(ctx.clone()) };
    let resp = c.get_features(ask(user.clone(), vec![stale_ad, fresh_ad])).await?.into_inner();
    let registry = adserve_features::registry();
    let matrix = resp.matrix.expect("an answer");
    let col = |name: &str| registry.index_of(name).expect(name);
    let cols = matrix.feature_names.len();
    assert!((matrix.values[col("user_ctr_30d")] - 0.04).abs() < 1e-6, "stale values are still served");
    assert!((matrix.values[col("ad_ctr_7d")] - 0.03).abs() < 1e-6);
    assert!((matrix.values[cols + col("ad_ctr_7d")] - 0.02).abs() < 1e-6);
    let dynamo: Vec<&str> =
        resp.degraded.iter().filter(|d| d.component == "dynamodb").map(|d| d.reason.as_str()).collect();
    assert_eq!(dynamo.len(), 1, "{:?}", resp.degraded);
    let reason = dynamo[0];
    assert!(reason.contains("the user's batch features are 40 h old"), "{reason}");
    assert!(reason.contains("batch features of 1 of 2 ads"), "{reason}");
    assert!(reason.contains("freshness_sla"), "{reason}");
    // The fresh ad alone, for a user the store does not know: nothing stale.
    let resp = c.get_features(ask(format!("nobody-{run}"), vec![fresh_ad])).await?.into_inner();
    assert!(!resp.degraded.iter().any(|d| d.reason.contains("freshness_sla")), "{:?}", resp.degraded);
    Ok(())
}

/// Asserts that the served matrix's typed blocks (categorical ids, then
/// embeddings) equal the offline output's typed columns, row by row;
/// returns the cells compared.
fn same_typed(
    registry: &adserve_features::FeatureRegistry,
    served: &adserve_proto::v1::FeatureMatrix,
    offline: &RecordBatch,
    ads: &[i64],
) -> usize {
    let mut compared = 0;
    let cats = registry.categorical.len();
    for (k, f) in registry.categorical.iter().enumerate() {
        let col = offline.column_by_name(&f.name).unwrap_or_else(|| panic!("offline output lacks {}", f.name));
        let col = col.as_primitive::<arrow::datatypes::Int64Type>();
        for (row, ad) in ads.iter().enumerate() {
            assert_eq!(served.categorical_ids[row * cats + k], col.value(row), "{}, ad {ad}", f.name);
            compared += 1;
        }
    }
    let width: usize = registry.embeddings.iter().map(|f| f.dim.unwrap_or(0) as usize).sum();
    let mut at = 0;
    for f in &registry.embeddings {
        let dim = f.dim.unwrap_or(0) as usize;
        let col = offline.column_by_name(&f.name).unwrap_or_else(|| panic!("offline output lacks {}", f.name));
        let col = col.as_fixed_size_list();
        for (row, ad) in ads.iter().enumerate() {
            let offline_v = col.value(row);
            let offline_v = offline_v.as_primitive::<Float32Type>().values();
            let served_v = &served.embedding_values[row * width + at..row * width + at + dim];
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(served_v), bits(offline_v), "{}, ad {ad}", f.name);
            compared += dim;
        }
        at += dim;
    }
    compared
}

/// The embedded registry plus typed batch-tier features (categoricals and
/// embeddings from DynamoDB, and a cross of a stored categorical with the
/// request's device), over tables of the test's own.
fn typed_registry(run: i64) -> anyhow::Result<(&'static adserve_features::FeatureRegistry, String)> {
    let feature = |body: &str| {
        format!(
            "\n[[feature]]\n{body}source = \"dynamodb\"\ndescription = \"t\"\nowner = \"t\"\nfreshness_sla = \"36h\"\n"
        )
    };
    let mut text = adserve_features::REGISTRY_TOML
        .replace("\"adserve_user_features\"", &format!("\"typed_users_{run}\""))
        .replace("\"adserve_ad_features\"", &format!("\"typed_ads_{run}\""));
    text += &feature(
        "name = \"user_segment\"\nentity = \"user\"\nattribute = \"segment\"\ntype = \"categorical\"\nbuckets = 100\ndefault = 0\npersonal = true\n",
    );
    text += &feature(
        "name = \"ad_category\"\nentity = \"ad\"\nattribute = \"category\"\ntype = \"categorical\"\nbuckets = 1000\ndefault = 0\n",
    );
    text += &feature(
        "name = \"user_vec\"\nentity = \"user\"\nattribute = \"vec\"\ntype = \"embedding\"\ndim = 3\nrange = [-1.0, 1.0]\ndefault = 0.0\npersonal = true\n",
    );
    text += &feature(
        "name = \"ad_vec\"\nentity = \"ad\"\nattribute = \"vec\"\ntype = \"embedding\"\ndim = 2\nrange = [-1.0, 1.0]\ndefault = 0.0\n",
    );
    text += "\n[[feature]]\nname = \"ad_category_x_device\"\nentity = \"ad\"\nsource = \"cross\"\nattribute = \"category_x_device\"\n\
             type = \"categorical\"\ncross = [\"ad_category\", \"ctx_device_id\"]\nbuckets = 4096\ndefault = 0\n\
             description = \"t\"\nowner = \"t\"\n";
    let registry = adserve_features::FeatureRegistry::parse(&text).map_err(anyhow::Error::msg)?;
    Ok((Box::leak(Box::new(registry)), text))
}

#[tokio::test]
async fn typed_batch_features_are_read_from_dynamodb_and_served_hashed_and_checked() -> anyhow::Result<()> {
    // A feature-service (in process) over the real DynamoDB Local and Redis,
    // with a registry that declares categoricals and embeddings in the batch
    // tier: stored as S and L of N, served as bucket ids (crosses included)
    // and vectors, the same through the in-process ad table and through a
    // per-request lookup; a vector outside its range is the default, counted.
    use adserve_feature_service::{AdTable, BatchRow, BatchStore, FeatureGrpc, RealtimeStore, config};
    use adserve_proto::v1::feature_service_server::FeatureService as _;

    let s = Stack::ready().await?;
    let run = uuid::Uuid::new_v4().as_u128() as i64 & 0x3fff_ffff;
    let (registry, _) = typed_registry(run)?;
    let dynamo =
        config::DynamoConfig { endpoint: s.dynamodb.clone(), timeout: Duration::from_secs(5), ..Default::default() };
    let store = BatchStore::new(&dynamo, registry);
    store.ensure_tables().await?;
    let user = format!("typed-user-{run}");
    let (a, b) = (1_000 + run, 2_000 + run);
    let user_row = BatchRow {
        id: user.clone(),
        values: HashMap::from([("ctr_30d".to_string(), 0.05)]),
        text: HashMap::from([("segment".to_string(), "sports".to_string())]),
        vectors: HashMap::from([("vec".to_string(), vec![0.1, 0.2, 0.3])]),
        ..Default::default()
    };
    store.put_rows(Entity::User, &[user_row]).await?;
    let ads = [
        BatchRow {
            id: a.to_string(),
            text: HashMap::from([("category".to_string(), "shoes".to_string())]),
            vectors: HashMap::from([("vec".to_string(), vec![0.5, -0.5])]),
            ..Default::default()
        },
        // No category; a vector element outside [-1, 1].
        BatchRow {
            id: b.to_string(),
            vectors: HashMap::from([("vec".to_string(), vec![0.5, 2.0])]),
            ..Default::default()
        },
    ];
    store.put_rows(Entity::Ad, &ads).await?;
    store.bump_ad_version().await?;

    let redis = config::RedisConfig { url: s.redis.clone(), timeout: Duration::from_secs(2) };
    let realtime = RealtimeStore::connect(&redis, registry).await?;
    let plain = FeatureGrpc::new(
        registry,
        store.clone(),
        realtime.clone(),
        Duration::from_secs(2),
        Duration::from_secs(2),
        100,
    );
    let table = AdTable::for_registry(registry);
    assert!(table.refresh_once(&store, Duration::from_secs(60)).await?);
    let tabled =
        FeatureGrpc::new(registry, store.clone(), realtime, Duration::from_secs(2), Duration::from_secs(2), 100)
            .with_ad_table(table);

    let spec = |name: &str| registry.categorical.iter().chain(&registry.embeddings).find(|f| f.name == name).unwrap();
    let (cats, embs) =
        (registry.categorical.len(), registry.embeddings.iter().map(|f| f.dim.unwrap() as usize).sum::<usize>());
    let column = |name: &str| registry.categorical.iter().position(|f| f.name == name).unwrap();
    let request = GetFeaturesRequest {
        user_id: user.clone(),
        ad_ids: vec![a, b],
        context: Some(RequestContext { placement: "feed_top".into(), device: "mobile".into(), ..Default::default() }),
    };
    for (how, service) in [("per-request lookup", &plain), ("ad table", &tabled)] {
        let resp = service.get_features(tonic::Request::new(request.clone())).await?.into_inner();
        assert!(resp.degraded.is_empty(), "{how}: {:?}", resp.degraded);
        let m = resp.matrix.expect("matrix");
        assert_eq!(m.categorical_ids.len(), 2 * cats, "{how}");
        let id = |row: usize, name: &str| m.categorical_ids[row * cats + column(name)];
        let sports = spec("user_segment").category_id(Some("sports"));
        assert!(sports > 0);
        assert_eq!((id(0, "user_segment"), id(1, "user_segment")), (sports, sports), "{how}");
        assert_eq!(id(0, "ad_category"), spec("ad_category").category_id(Some("shoes")), "{how}");
        assert_eq!(id(1, "ad_category"), 0, "{how}: no category is bucket 0");
        assert_eq!(id(0, "ad_category_x_device"), spec("ad_category_x_device").cross_id(Some("shoes"), Some("mobile")));
        assert_eq!(id(1, "ad_category_x_device"), 0, "{how}: a cross with a missing operand is 0");
        assert_eq!(m.embedding_names, ["user_vec", "ad_vec"]);
        assert_eq!(m.embedding_values.len(), 2 * embs);
        assert_eq!(m.embedding_values[..embs], [0.1, 0.2, 0.3, 0.5, -0.5], "{how}");
        assert_eq!(
            m.embedding_values[embs..],
            [0.1, 0.2, 0.3, 0.0, 0.0],
            "{how}: the out-of-range vector is the default"
        );
        let dense = registry.features.len();
        let (cat, vec) = (dense + column("ad_category"), dense + cats + 1);
        assert_eq!((resp.missing[cat], resp.invalid[vec]), (1, 1), "{how}: counted as missing and invalid");
        // The dense batch value still comes through beside them.
        let ctr = registry.index_of("user_ctr_30d").unwrap();
        assert!((m.values[ctr] - 0.05).abs() < 1e-6, "{how}");
    }
    // COPPA: personal typed features are never read.
    let mut coppa = request.clone();
    coppa.context.as_mut().unwrap().coppa = true;
    let m = tabled.get_features(tonic::Request::new(coppa)).await?.into_inner().matrix.expect("matrix");
    assert_eq!(m.categorical_ids[column("user_segment")], 0);
    assert_eq!(m.embedding_values[..3], [0.0, 0.0, 0.0]);
    assert_eq!(m.categorical_ids[column("ad_category")], spec("ad_category").category_id(Some("shoes")));
    Ok(())
}

#[tokio::test]
async fn typed_batch_features_are_identical_through_the_serving_and_training_paths() -> anyhow::Result<()> {
    // One registry file with typed batch features, one pair of batch files:
    // backfilled into DynamoDB Local and served by a feature-service (in
    // process, over the real stores), and retrieved point-in-time by the
    // trainer's offline path (its own process) from the same files. Ids and
    // vectors must be identical, stale history and refused vectors included.
    use adserve_feature_service::{AdTable, BatchStore, FeatureGrpc, RealtimeStore, backfill, config};
    use adserve_proto::v1::feature_service_server::FeatureService as _;
    use arrow::array::{
        Array as _, ListArray,
        builder::{Float32Builder, ListBuilder},
    };

    let s = Stack::ready().await?;
    let run = uuid::Uuid::new_v4().as_u128() as i64 & 0x3fff_ffff;
    let (registry, text) = typed_registry(run)?;
    let dir = tempfile::tempdir()?;
    let registry_file = dir.path().join("features.toml");
    std::fs::write(&registry_file, &text)?;
    let dynamo =
        config::DynamoConfig { endpoint: s.dynamodb.clone(), timeout: Duration::from_secs(5), ..Default::default() };
    let store = BatchStore::new(&dynamo, registry);
    store.ensure_tables().await?;
    let now = backfill::now_ms();
    let hour = 3_600_000;
    let user = format!("typed-identity-{run}");
    let ads: Vec<i64> = (0..3).map(|i| 5_000 + run * 4 + i).collect();

    // A batch file of `entity`: key, time, the dense attributes (0.5), a
    // categorical column and a vector column.
    type TypedRow<'a> = (String, i64, Option<&'a str>, Option<Vec<f32>>);
    let write = |path: &Path, entity: Entity, rows: &[TypedRow<'_>], cat: &str| -> anyhow::Result<()> {
        let key = if entity == Entity::User { "user_id" } else { "ad_id" };
        let mut fields = vec![
            Field::new(key, if entity == Entity::User { DataType::Utf8 } else { DataType::Int64 }, false),
            Field::new(EVENT_TIMESTAMP, DataType::Int64, false),
        ];
        let dense: BTreeSet<String> =
            registry.select(entity, Source::Dynamodb).map(|(_, f)| f.attribute.clone()).collect();
        fields.extend(dense.iter().map(|a| Field::new(a, DataType::Float64, true)));
        let mut vecs = ListBuilder::new(Float32Builder::new());
        for (.., v) in rows {
            match v {
                Some(v) => {
                    vecs.values().append_slice(v);
                    vecs.append(true);
                }
                None => vecs.append(false),
            }
        }
        let vecs: ListArray = vecs.finish();
        fields.push(Field::new(cat, DataType::Utf8, true));
        fields.push(Field::new("vec", vecs.data_type().clone(), true));
        // The embedded registry's own categoricals, unknown here.
        let texts = text_attributes(entity);
        fields.extend(texts.iter().map(|a| Field::new(a, DataType::Utf8, true)));
        let keys: ArrayRef = if entity == Entity::User {
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0.as_str())))
        } else {
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.0.parse::<i64>().unwrap())))
        };
        let mut columns: Vec<ArrayRef> = vec![keys, Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.1)))];
        for _ in &dense {
            columns.push(Arc::new(Float64Array::from_iter(rows.iter().map(|_| Some(0.5)))));
        }
        columns.push(Arc::new(StringArray::from_iter(rows.iter().map(|r| r.2))));
        columns.push(Arc::new(vecs));
        for _ in &texts {
            columns.push(Arc::new(StringArray::from(vec![None::<&str>; rows.len()])));
        }
        let schema = Arc::new(Schema::new(fields));
        let mut w = ArrowWriter::try_new(File::create(path)?, schema.clone(), None)?;
        w.write(&RecordBatch::try_new(schema, columns)?)?;
        w.close()?;
        Ok(())
    };
    let users = [
        (user.clone(), now - 48 * hour, Some("news"), Some(vec![0.9, 0.9, 0.9])),
        (user.clone(), now - hour, Some("sports"), Some(vec![0.1, 1.0 / 3.0, -0.3])),
    ];
    let ad_rows = [
        (ads[0].to_string(), now - 48 * hour, Some("hats"), Some(vec![0.2, 0.2])),
        (ads[0].to_string(), now - hour, Some("shoes"), Some(vec![0.5, -0.5])),
        (ads[1].to_string(), now - hour, None, Some(vec![0.5, 2.0])), // no category; out of range
        (ads[2].to_string(), now - hour, Some("boots"), None),
    ];
    let (user_file, ad_file) = (dir.path().join("users.parquet"), dir.path().join("ads.parquet"));
    write(&user_file, Entity::User, &users, "segment")?;
    write(&ad_file, Entity::Ad, &ad_rows, "category")?;
    for (file, entity) in [(&user_file, Entity::User), (&ad_file, Entity::Ad)] {
        let plan = backfill::plan(file, entity, registry)?;
        backfill::run(&plan, &store, &backfill::Options::for_input(file), |_| {}).await?;
    }

    // Serving.
    let redis = config::RedisConfig { url: s.redis.clone(), timeout: Duration::from_secs(2) };
    let realtime = RealtimeStore::connect(&redis, registry).await?;
    let table = AdTable::for_registry(registry);
    table.refresh_once(&store, Duration::from_secs(60)).await?;
    let service = FeatureGrpc::new(registry, store, realtime, Duration::from_secs(2), Duration::from_secs(2), 100)
        .with_ad_table(table);
    let ctx = RequestContext { placement: "sidebar".into(), device: "tablet".into(), ..Default::default() };
    let request = GetFeaturesRequest { user_id: user.clone(), ad_ids: ads.clone(), context: Some(ctx.clone()) };
    let served = service.get_features(tonic::Request::new(request)).await?.into_inner().matrix.expect("matrix");

    // Training: point-in-time retrieval over the same files and registry.
    let n = ads.len();
    let offline =
        offline_rows(dir.path(), (&user, &ads, now, &ctx), (&user_file, &ad_file), Some(&registry_file)).await?;
    let width = 3 + 2;
    assert_eq!(same_typed(registry, &served, &offline, &ads), n * (registry.categorical.len() + width));

    // Not all defaults: the latest rows reached both paths.
    let spec = |name: &str| registry.categorical.iter().find(|f| f.name == name).unwrap();
    let cats = registry.categorical.len();
    let column = |name: &str| registry.categorical.iter().position(|f| f.name == name).unwrap();
    assert_eq!(served.categorical_ids[column("user_segment")], spec("user_segment").category_id(Some("sports")));
    assert_eq!(served.categorical_ids[column("ad_category")], spec("ad_category").category_id(Some("shoes")));
    assert_eq!(
        served.categorical_ids[2 * cats + column("ad_category")],
        spec("ad_category").category_id(Some("boots"))
    );
    assert_eq!(served.embedding_values[..width], [0.1, 1.0 / 3.0, -0.3, 0.5, -0.5]);
    assert_eq!(served.embedding_values[width + 3..2 * width], [0.0, 0.0], "the refused vector is the default");
    Ok(())
}
