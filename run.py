"""Train and evaluate: ``python run.py model=xlmr sampler=hybrid`` (see conf/config.yaml and README.md)."""

import logging

from omegaconf import DictConfig

from hybrid_retrieval.cli import hydra_main


@hydra_main("config", config_path="conf")
def main(cfg: DictConfig) -> float:
    from hybrid_retrieval.run_folder import finished_job, job_folder, lock_run_folder, plan_run
    from hybrid_retrieval.tracking import folder_status
    from hybrid_retrieval.training.config import check_train_config

    done = finished_job(cfg)  # train.resume=auto in a rerun sweep: a finished job is not run again
    if done is not None:
        logging.getLogger(__name__).info("this job finished before (%s = %.4f): skipped", cfg.train.monitor, done)
        return done
    lock_run_folder(job_folder())  # before status.json: a second process must not touch a folder in use
    with folder_status():
        check_train_config(cfg)  # before the heavy imports: a bad option fails in seconds
        plan = plan_run(cfg)  # train.resume, resolved once: a fresh run or which checkpoint it continues
        from hybrid_retrieval.training.inputs import load_training_inputs

        inputs = load_training_inputs(cfg)  # and so does bad data
        from hybrid_retrieval.training.train import train

        return train(cfg, inputs, plan)


if __name__ == "__main__":
    main()
