//! What runs inside a rank process: models, data, the training loop, collectives, checkpoints.

pub mod checkpoint;
pub mod comm;
pub mod data;
pub mod export;
pub mod model;
pub mod rank;
pub mod report;
pub mod reshard;
pub mod stage;
pub mod train;
