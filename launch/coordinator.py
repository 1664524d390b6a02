"""The jblock coordinator: the client-facing gRPC API (Inference, Admin).

Until workers serve blocks over the Worker service, the coordinator's engine runs in
process, so this runs the same server as launch.serve and takes the same flags.

  python -m launch.coordinator --engine=mock --port=50051
"""

from absl import app

from launch import serve

if __name__ == "__main__":
  app.run(serve.main)
