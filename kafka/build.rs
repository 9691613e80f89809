//! Rebuilds when a migration is added: `embed_migrations!` reads the folder at compile time.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
