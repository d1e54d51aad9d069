// `sqlx::migrate!` embeds migrations/ at compile time: rebuild when a migration is added
// (what `sqlx migrate build-script` writes).
fn main() {
    println!("cargo:rerun-if-changed=../../migrations");
}
